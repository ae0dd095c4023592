"""Rank selection in one place.

A per-layer rank request is an ``int`` (the rank itself; ``(R1, R2)`` for tucker2), a
:class:`Ratio` (this layer's parameter compression ratio) or an :class:`ErrorBudget` (largest
allowed relative Sigma error); :func:`resolve_rank` turns any of them into ranks.

Whole-model targets (:func:`allocate`): a compression ratio of the whole model, counted in
parameters or multiply-adds, spread over the selected layers by one of three strategies:

* ``uniform``: every layer shrinks by the same factor (the protocol of the uniform-ratio baselines);
* ``global``: the budget goes where the Sigma error per parameter saved is smallest. Each
  layer's error curve comes from its whitened spectrum: the singular values of ``W Sigma^{1/2}``
  give the exact relative Sigma error of the best rank-r SVD, ``sum_{i>r} s_i^2 / sum_i s_i^2``
  (errors are relative to the layer's output energy, so layers are comparable). The curve is
  indexed by the fraction of the layer's parameters kept, which is how it is carried over to
  Tucker2 / CP (an estimate for those formats; the achieved error is measured and reported);
* ``vbmf``: the rank of each layer from empirical variational Bayesian matrix factorisation of
  the whitened matrix (Nakajima et al. 2013, as used by MUSCO), no target needed.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .solvers.formats import param_count, rank_for_budget, tt_matrix_macs, tt_matrix_modes, tt_ranks

__all__ = [
    "Ratio",
    "ErrorBudget",
    "LayerShape",
    "whitened_spectrum",
    "spectrum_error",
    "resolve_rank",
    "allocate",
    "check_rank_request",
    "evbmf_rank",
    "format_params",
    "format_macs",
]


@dataclass(frozen=True)
class Ratio:
    """Per-layer parameter compression ratio (dense / compressed), > 1."""

    value: float

    def __post_init__(self):
        if not 1 < self.value < float("inf"):
            raise InputError(f"a compression ratio must be a finite number > 1, got {self.value}",
                             hint="e.g. 4 for 4x fewer parameters")


@dataclass(frozen=True)
class ErrorBudget:
    """Largest allowed relative Sigma error of a layer, in (0, 1)."""

    value: float

    def __post_init__(self):
        if not 0 < self.value < 1:
            raise InputError(f"an error budget must be in (0, 1), got {self.value}",
                             hint="e.g. 0.05 for at most 5% of the layer's output energy")


@dataclass(frozen=True)
class LayerShape:
    """What rank selection needs to know about a layer.

    ``T`` output channels, ``S`` input channels per group, kernel ``kh x kw``, ``groups``;
    ``pos_in`` / ``pos_out``: input and output positions per image (1 for Linear).
    """

    T: int
    S: int
    kh: int = 1
    kw: int = 1
    groups: int = 1
    pos_in: int = 1
    pos_out: int = 1

    @property
    def dense_params(self) -> int:
        return self.T * self.S * self.kh * self.kw

    @property
    def dense_macs(self) -> int:
        return self.dense_params * self.pos_out


def format_params(fmt: str, shape: LayerShape, ranks) -> int:
    """Weights of the layer in ``fmt`` (``dense``: the original)."""
    if fmt == "dense":
        return shape.dense_params
    g = shape.groups
    return g * param_count(fmt, shape.T // g, shape.S, shape.kh, shape.kw, ranks)


def format_macs(fmt: str, shape: LayerShape, ranks) -> int:
    """Multiply-adds per image of the layer in ``fmt`` (the 1x1 input convs of tucker2 / cp run
    at the input resolution, the rest at the output resolution)."""
    g, T, S, kh, kw = shape.groups, shape.T // shape.groups, shape.S, shape.kh, shape.kw
    pin, pout = shape.pos_in, shape.pos_out
    if fmt == "dense":
        return shape.dense_macs
    if fmt == "svd":
        return g * int(ranks) * (S * kh * kw + T) * pout
    if fmt == "tucker2":
        r1, r2 = ranks
        return g * (S * r2 * pin + r1 * r2 * kh * kw * pout + r1 * T * pout)
    if fmt == "cp3":
        return g * int(ranks) * (S * pin + kh * kw * pout + T * pout)
    if fmt == "cp4":
        mid = math.sqrt(pin * pout)  # after the k x 1 conv: output rows, input columns
        return g * int(ranks) * (S * pin + kh * mid + kw * pout + T * pout)
    if fmt == "tt":
        rs = tt_ranks(T, S, kh, kw, ranks)
        if kh * kw > 1:  # Sainz de la Maza Gamboa, Table 6.1 (ddtd.solvers.formats): 1x1 at the input resolution, the rest as cp4
            R1, R2, R3 = rs
            mid = math.sqrt(pin * pout)
            return g * int(S * R1 * pin + kh * R1 * R2 * mid + kw * R2 * R3 * pout + R3 * T * pout)
        return g * tt_matrix_macs(*tt_matrix_modes(T, S, len(rs) + 1), rs) * pout
    raise InputError(f"unknown format {fmt!r}")


def whitened_spectrum(weight: torch.Tensor, sigma: torch.Tensor | None,
                      out_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared singular values of ``D^{1/2} W Sigma^{1/2}`` per group, descending:
    ``(g, min(T_g, D))``.

    Computed as the eigenvalues of ``D^{1/2} W Sigma W^T D^{1/2}`` (``T x T``), float64.
    ``sigma`` is ``(g, D, D)`` (or ``None``: ``Sigma = I``); ``out_weights`` the ``(T,)``
    output-channel weights ``D`` (:func:`ddtd.sensitivity.output_sensitivity`; ``None``: ``I``).
    """
    T = weight.shape[0]
    g = 1 if sigma is None else sigma.shape[0]
    W = weight.reshape(g, T // g, -1).to(torch.float64)
    if out_weights is not None:
        W = W * out_weights.to(torch.float64).sqrt().reshape(g, T // g, 1)
    if sigma is None:
        G = W @ W.transpose(1, 2)
    else:
        G = W @ sigma.to(W.device, torch.float64) @ W.transpose(1, 2)
    try:
        ev = torch.linalg.eigvalsh(G)
    except torch.linalg.LinAlgError:  # rare non-convergence on ill-conditioned inputs
        from .solvers import eigh

        ev = eigh(G)[0]
    ev = ev.clamp_min(0).flip(-1)
    return ev[:, : min(W.shape[1], W.shape[2])]


def spectrum_error(spec2: torch.Tensor, rank: int) -> float:
    """Relative Sigma error of the best rank-``rank`` SVD (per group rank), from the spectrum."""
    total = float(spec2.sum())
    if total <= 0:
        return 0.0
    return float(spec2[:, rank:].sum()) / total


def _error_at_fraction(spec2: torch.Tensor, shape: LayerShape, frac: float, weight: float | None = None) -> float:
    """Error curve indexed by the kept fraction of parameters, via the SVD format: relative to
    the layer's output energy, or ``weight`` times the absolute discarded energy."""
    g = shape.groups
    per_rank = param_count("svd", shape.T // g, shape.S, shape.kh, shape.kw, 1) * g
    r = max(0, min(int(frac * shape.dense_params // per_rank), spec2.shape[1]))
    if weight is None:
        return spectrum_error(spec2, r)
    return weight * float(spec2[:, r:].sum())


def resolve_rank(request, fmt: str, shape: LayerShape, spec2: torch.Tensor | None = None, name: str = "?"):
    """Turn a rank request into ranks for format ``fmt``, or ``None`` when the layer would not shrink.

    ``request``: ``int`` / ``(R1, R2)`` (explicit), :class:`Ratio`, or :class:`ErrorBudget`
    (needs ``spec2`` from :func:`whitened_spectrum`).
    """
    g = shape.groups
    T, S, kh, kw = shape.T // g, shape.S, shape.kh, shape.kw
    if isinstance(request, ErrorBudget):
        if spec2 is None:
            raise InputError(f"layer '{name}': an error budget needs the layer's covariance")
        n = spec2.shape[1]
        r = next((r for r in range(1, n + 1) if spectrum_error(spec2, r) <= request.value), n)
        budget = format_params("svd", shape, r) / g
    elif isinstance(request, Ratio):
        budget = T * S * kh * kw / request.value
    else:
        ranks = tuple(request) if isinstance(request, (tuple, list)) else int(request)
        _check_explicit(fmt, ranks, T, S, kh, kw, name)
        return (ranks, ranks) if fmt == "tucker2" and isinstance(ranks, int) else ranks
    if budget >= T * S * kh * kw:
        return None
    ranks = rank_for_budget(fmt, T, S, kh, kw, budget)
    if param_count(fmt, T, S, kh, kw, ranks) >= T * S * kh * kw:
        return None
    return ranks


def check_rank_request(rank):
    """The one check of a rank request: an ``int`` >= 1, a ``(R1, R2)`` pair of them (tucker2),
    or a ``float`` > 1 (a per-layer compression ratio). Returns it normalised (a list becomes a
    tuple, an integral float given as a rank stays a ratio)."""
    if isinstance(rank, (tuple, list)):
        if len(rank) != 2 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rank):
            raise InputError(f"a rank pair must be two ints >= 1 (tucker2's R1, R2), got {rank!r}",
                             hint="e.g. (16, 8)")
        return tuple(rank)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise InputError(f"rank must be an int >= 1, a pair (R1, R2) or a per-layer ratio > 1, got {rank!r}",
                         hint="e.g. 16, (16, 8) or 2.5")
    if isinstance(rank, int) and rank < 1:
        raise InputError(f"a rank must be at least 1, got {rank}", hint="e.g. 16")
    if isinstance(rank, float):
        Ratio(rank)
    return rank


def _check_explicit(fmt, ranks, T, S, kh, kw, name):
    D = S * kh * kw
    if fmt == "tt":
        rs = ranks if isinstance(ranks, tuple) else (ranks,)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rs):
            raise InputError(f"layer '{name}': tt ranks must be ints >= 1, got {ranks}", hint="e.g. 16")
        return
    if fmt == "tucker2":
        r1, r2 = ranks if isinstance(ranks, tuple) else (ranks, ranks)  # an int R is (R, R)
        if not (1 <= r1 <= T and 1 <= r2 <= S):
            raise InputError(f"layer '{name}': tucker2 ranks {ranks} impossible for T={T}, S={S}",
                             hint=f"use 1 <= R1 <= {T} and 1 <= R2 <= {S}")
        return
    if isinstance(ranks, tuple) or ranks < 1:
        raise InputError(f"layer '{name}': rank must be a positive int, got {ranks}")
    if fmt == "svd" and ranks > min(T, D):
        raise InputError(f"layer '{name}': rank {ranks} is larger than the layer allows ({min(T, D)})",
                         hint=f"use a rank <= min(out, in*kh*kw) = {min(T, D)}")


def _slower_than_dense(fmt: str, shape: LayerShape, ranks) -> bool:
    """Whether ``fmt`` at ``ranks`` needs more multiply-adds than the dense layer (a budget of
    ``both`` keeps such a layer dense, so the allocation must not count its savings)."""
    return format_macs(fmt, shape, ranks) > shape.dense_macs


def _uniform_plan(shapes, fmts, target, measure, fixed, mac_cap=False):
    """Same per-layer ratio rho for every layer, found by bisection on the achieved total."""

    def total_at(rho):
        plan, tot = {}, fixed
        for name, shape in shapes.items():
            ranks = resolve_rank(Ratio(rho), fmts[name], shape, name=name) if rho > 1 else None
            if ranks is not None and mac_cap and _slower_than_dense(fmts[name], shape, ranks):
                ranks = None
            plan[name] = ranks
            tot += measure(fmts[name] if ranks is not None else "dense", shape, ranks)
        return plan, tot

    lo, hi = 1.0, 1.0
    while total_at(hi)[1] > target and hi < 1e6:
        hi *= 2
    if total_at(hi)[1] > target:
        return None
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if total_at(mid)[1] > target:
            lo = mid
        else:
            hi = mid
    return total_at(hi)[0]


def _global_plan(shapes, fmts, target, measure, fixed, spectra, steps=64, weights=None, max_layer_error=None,
                 mac_cap=False):
    """Greedy: repeatedly shrink the layer whose error rises least per unit saved (errors
    relative to each layer's output energy, or weighted absolute errors, see :func:`allocate`)."""
    frac = {n: 1.0 for n in shapes}
    cost = {n: measure("dense", s, None) for n, s in shapes.items()}

    def ranks_at(name, f):
        shape = shapes[name]
        if f >= 1.0:
            return None
        budget_params = f * shape.dense_params / shape.groups
        g = shape.groups
        r = rank_for_budget(fmts[name], shape.T // g, shape.S, shape.kh, shape.kw, budget_params)
        if param_count(fmts[name], shape.T // g, shape.S, shape.kh, shape.kw, r) * g >= shape.dense_params:
            return None
        if mac_cap and _slower_than_dense(fmts[name], shape, r):
            return None
        return r

    def candidate(name):
        f = frac[name]
        shape = shapes[name]
        new_f = f
        while True:  # step down until the rank actually changes (small layers are coarse)
            new_f = new_f - 1.0 / steps if new_f < 1.0 else _first_fraction(shape, fmts[name])
            if new_f <= 0:
                return None
            r = ranks_at(name, new_f)
            if r is None:
                continue
            new_cost = measure(fmts[name], shape, r)
            saved = cost[name] - new_cost
            if saved > 0:
                break
        if max_layer_error is not None and _error_at_fraction(spectra[name], shape, new_f) > max_layer_error:
            return None
        w = None if weights is None else weights[name]
        err_now = _error_at_fraction(spectra[name], shape, f, w) if f < 1.0 else 0.0
        err_new = _error_at_fraction(spectra[name], shape, new_f, w)
        return ((err_new - err_now) / saved, name, new_f, new_cost)

    total = fixed + sum(cost.values())
    heap = [c for c in (candidate(n) for n in shapes) if c is not None]
    heapq.heapify(heap)
    last = None
    while total > target and heap:
        _, name, new_f, new_cost = heapq.heappop(heap)
        last = (name, frac[name])
        total += new_cost - cost[name]
        cost[name], frac[name] = new_cost, new_f
        nxt = candidate(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    if total > target:
        return None
    if last is not None:  # the last step may overshoot: keep as much of that layer as still fits
        name, f_hi = last
        f_lo, shape = frac[name], shapes[name]
        for _ in range(30):
            mid = 0.5 * (f_lo + f_hi)
            r = ranks_at(name, mid)
            c = measure("dense", shape, None) if r is None else measure(fmts[name], shape, r)
            if total - cost[name] + c <= target:
                f_lo = mid
            else:
                f_hi = mid
        r = ranks_at(name, f_lo)
        c = measure("dense", shape, None) if r is None else measure(fmts[name], shape, r)
        total += c - cost[name]
        cost[name], frac[name] = c, f_lo
    return {n: ranks_at(n, frac[n]) for n in shapes}


def _first_fraction(shape: LayerShape, fmt: str) -> float:
    """Largest kept fraction at which ``fmt`` is smaller than the dense layer."""
    g = shape.groups
    T, S, kh, kw = shape.T // g, shape.S, shape.kh, shape.kw
    dense = T * S * kh * kw
    for i in range(1, 1000):
        f = 1.0 - i / 1000
        r = rank_for_budget(fmt, T, S, kh, kw, f * dense)
        if param_count(fmt, T, S, kh, kw, r) < dense:
            return f
    return 0.0


#: With weighted errors, no layer may lose more than this share of its own (weighted) output
#: energy; the smallest cap that reaches the target is used. The second-order weights price
#: small errors well and large ones badly (a layer cut to rank 1-2 can destroy a model the
#: weights call cheap), so the budget is spread before it is concentrated.
LAYER_ERROR_CAPS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, None)


def allocate(shapes: dict[str, LayerShape], fmts: dict[str, str], request, *, total: int,
             spectra: dict[str, torch.Tensor] | None = None,
             weights: dict[str, float] | None = None) -> dict:
    """Per-layer ranks (``None`` = leave dense) so that the whole model shrinks by ``request.ratio``.

    Args:
        shapes, fmts: the selected layers and the format each will use.
        request: a :class:`ddtd.config.Size` (or any object with ``ratio``, ``budget`` and
            ``strategy``): the whole-model ratio (> 1), counted in parameters (``budget`` ``params``
            or ``both``) or multiply-adds (``flops``), spread ``uniform`` or ``global`` (``global``
            needs ``spectra``).
        total: the whole model's parameters (or multiply-adds), selected layers included.
        weights: ``global`` only. ``None``: a layer's error is its discarded Sigma energy relative
            to its own output energy (every layer counts alike). Otherwise the error of layer
            ``l`` is ``weights[l] * E||y_l - y~_l||^2``, the absolute discarded energy per output
            position weighted by the layer's effect on the model's output
            (:func:`ddtd.sensitivity.output_sensitivity`), so the budget goes where the model's
            output changes least.
    """
    ratio, budget, strategy = request.ratio, request.budget, request.strategy
    if not ratio > 1:
        raise InputError(f"the compression ratio must be > 1, got {ratio}", hint="e.g. --ratio 4")
    measure = format_params if budget in ("params", "both") else format_macs
    if budget not in ("params", "both", "flops"):
        raise InputError(f"unknown budget {budget!r}", hint="use both, params or flops")
    selected = sum(measure("dense", s, None) for s in shapes.values())
    fixed = total - selected
    target = total / ratio
    if strategy == "uniform":
        plan = _uniform_plan(shapes, fmts, target, measure, fixed, mac_cap=budget == "both")
    elif strategy == "global":
        plan = None
        for cap in (LAYER_ERROR_CAPS if weights is not None else (None,)):
            plan = _global_plan(shapes, fmts, target, measure, fixed, spectra, weights=weights, max_layer_error=cap,
                                mac_cap=budget == "both")
            if plan is not None:
                break
    else:
        raise InputError(f"unknown rank strategy {strategy!r}", hint="use uniform, global or vbmf")
    if plan is None:
        raise InputError(
            f"a {ratio}x {budget} ratio is out of reach: the {len(shapes)} selected layers hold "
            f"{selected / total:.0%} of the model's {budget}, the rest ({fixed}) stays",
            hint="select more layers (--layers, --include-first/--include-last) or ask for a smaller ratio",
        )
    return plan


# ---- VBMF -----------------------------------------------------------------------------------

def _tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0)))


def _evb_objective(sigma2, L, M, s, residual, xubar):
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return (np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
            + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (M * sigma2)
            + (L - H) * np.log(sigma2))


def evbmf_rank(singular_values: np.ndarray, shape: tuple[int, int], residual: float = 0.0) -> int:
    """Rank estimated by empirical VBMF with the noise variance estimated too.

    ``singular_values`` of an ``L x M`` matrix (any order); follows the global analytic solution
    of Nakajima et al., "Global analytic solution of fully-observed variational Bayesian matrix
    factorization" (JMLR 2013): the noise variance minimises the free energy on a bounded
    interval, and components above the threshold ``sqrt(M sigma2 (1 + tau)(1 + alpha / tau))``
    are kept.
    """
    from scipy.optimize import minimize_scalar

    L, M = sorted(shape)
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1][:L]
    s = s[s > 0]
    if len(s) == 0:
        return 0
    H = len(s)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = (np.sum(s**2) + residual) / (L * M)
    tail = s[eH_ub + 1 :] if eH_ub + 1 < H else s[-1:]
    lower = max(tail[0] ** 2 / (M * xubar), np.mean(tail**2) / M)
    if not lower < upper:
        lower = upper * 1e-6
    res = minimize_scalar(_evb_objective, args=(L, M, s, residual, xubar), bounds=(lower, upper),
                          method="bounded")
    sigma2 = res.x
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))
