"""Compression methods: one validated config per method, and a registry name -> solver + builder.

A *method* turns one layer's weight and input covariance into factors (a pure solver from
:mod:`ddtd.solvers`) and factors into modules (a builder from :mod:`ddtd.layers`). Every method
takes ``norm="sigma"`` (fit the output error on the calibration data) or ``norm="frobenius"``
(fit the weights, the baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .errors import InputError
from .solvers import cp_als, default_damping, sigma_svd, tucker2
from .solvers.formats import param_count

__all__ = ["MethodConfig", "Method", "Fit", "METHODS", "get_method", "layer_dims", "applicable",
           "AUTO_METHODS", "relative_sigma_error"]

NORMS = ("sigma", "frobenius")


@dataclass(frozen=True)
class MethodConfig:
    """Options common to every method; solver-specific ones go in ``options``.

    ``max_iter`` / ``tol`` apply to the iterative solvers (tucker2, cp3, cp4).
    ``options`` maps a method name to extra keywords, e.g. ``{"tucker2": {"init": "hosvd"},
    "lrs": {"sparsity": 0.5}, "cp3-stable": {"max_sweeps": 50}, "auto": {"stabilize": False}}``.
    """

    norm: str = "sigma"
    max_iter: int = 50
    tol: float = 1e-5
    seed: int = 0
    damping: float | None = None  # None: the solvers' rule, 1e-3 except 0 for svd (damping_for)
    bias_correction: bool | None = None  # b~ = b + (W - W~) mu; default: on for sigma only
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise InputError(f"unknown norm {self.norm!r}", hint=f"use one of {NORMS}")
        if self.max_iter < 1:
            raise InputError(f"max_iter must be >= 1, got {self.max_iter}")
        if not self.tol >= 0:
            raise InputError(f"tol must be >= 0, got {self.tol}")
        if self.damping is not None and not 0 <= self.damping < 1:
            raise InputError(f"damping must be in [0, 1), got {self.damping}")
        if not isinstance(self.options, dict) or any(
                k not in METHODS and k != "auto" or not isinstance(v, dict) for k, v in self.options.items()):
            raise InputError(f"options must map method names to dicts, got {self.options!r}",
                             hint=f"keys from {sorted(METHODS)} or 'auto', e.g. {{'lrs': {{'sparsity': 0.5}}}}")

    def damping_for(self, method: str) -> float:
        """Sigma is damped by ``damping * mean(diag(Sigma)) * I`` before fitting: ``self.damping``
        when set, else :func:`ddtd.solvers.default_damping` (``0`` for svd, ``1e-3`` for every
        other method), the default of the solvers themselves.

        The Sigma metric leaves directions with (almost) no input energy unconstrained; the
        closed-form SVD stays a projection of ``W`` there, but ALS factors of Tucker2 / CP can
        grow large along them and then amplify inputs that differ slightly from the
        calibration set. Measured on the reference ResNet-18 at 4x with cp3: 74.8% top-1
        undamped, 92.4% with 1e-3 and 92.3% with 1e-2 (original 92.3% on the same 2000 images).
        """
        if self.damping is not None:
            return self.damping
        return default_damping(method)


@dataclass(frozen=True)
class Fit:
    """What a method's solver returns for one layer.

    ``factors``: the builder's arguments (``kind``'s factor list; ``lrs`` / ``sparse``: one
    :class:`ddtd.solvers.lrs.LRSResult`); ``rel_error``: the solver's relative squared error of
    what it fitted; ``history``: its error history; ``info``: method extras for the report
    (every method: ``damping``, ``norm_ratio = ||W~||_F / ||W||_F`` and ``identity_error =
    ||W - W~||_F / ||W||_F`` of the solver's result, see :func:`ddtd.solvers.fit_diagnostics`
    and :func:`ddtd.solvers.norm_growth_warning`; ``sensitivity_before`` /
    ``sensitivity_after`` for CP, ``rank`` / ``nnz`` / ``bytes`` for low-rank + sparse).
    """

    factors: list
    rel_error: float
    history: list
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: how to solve, what it builds and how it is sized.

    ``kind``: the layer format it builds (a builder of :mod:`ddtd.layers`: ``svd``,
    ``tucker2``, ``cp3``, ``cp4``, or ``lrs`` for :class:`ddtd.layers.LowRankSparse`).
    ``sizing``: ``"ranks"`` (the plan gives ranks of ``kind``) or ``"budget"`` (the plan gives a
    storage budget in 4-byte units: the parameters an svd of the allocated rank would have).
    """

    name: str
    solve: Callable  # (weight, sigma | None, ranks, config, name) -> Fit
    conv_only: bool  # needs a k x k conv with several input channels per group
    description: str
    kind: str = ""
    sizing: str = "ranks"
    grouped: bool = True  # handles grouped / depthwise convs

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", self.name)


def layer_dims(layer: nn.Module) -> tuple[int, int, int, int, int]:
    """``(T, S_per_group, kh, kw, groups)``; a Linear layer is ``(T, D, 1, 1, 1)``."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels // layer.groups, kh, kw, layer.groups
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1, 1, 1
    raise InputError(f"unsupported layer type {type(layer).__name__}",
                     hint="ddtd compresses nn.Conv2d and nn.Linear layers")


def applicable(method: str, layer: nn.Module) -> tuple[bool, str]:
    """Can ``method`` represent ``layer``? Returns (ok, reason if not)."""
    T, S, kh, kw, g = layer_dims(layer)
    m = get_method(method)
    if m.conv_only and not isinstance(layer, nn.Conv2d):
        return False, f"{method} needs a Conv2d"
    if m.conv_only and kh * kw == 1:
        return False, f"{method} on a 1x1 conv is an SVD with extra layers; use svd"
    if m.conv_only and S == 1:
        return False, f"{method} needs several input channels per group (depthwise conv)"
    if not m.grouped and g > 1:
        return False, f"{method} does not handle grouped convs"
    return True, ""


def _options(cfg: MethodConfig, method: str) -> dict:
    """The solver options of ``cfg.options`` meant for ``method``: ``options[method]``."""
    return dict(cfg.options.get(method, {}))


#: the keys of a solver result's ``info`` that every :class:`Fit` carries
DIAGNOSTICS = ("damping", "norm_ratio", "identity_error")


def _diagnostics(res) -> dict:
    info = getattr(res, "info", None) or {}
    return {k: info[k] for k in DIAGNOSTICS if k in info}


def _svd(weight, sigma, ranks, cfg: MethodConfig, name):
    r = sigma_svd(weight, sigma, int(ranks), damping=cfg.damping_for("svd") if sigma is not None else 0.0, name=name)
    return Fit([r.A, r.B], r.rel_error, [r.rel_error], _diagnostics(r))


def _tucker2(weight, sigma, ranks, cfg: MethodConfig, name):
    r = tucker2(weight, sigma, tuple(ranks), max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed,
                damping=cfg.damping_for("tucker2") if sigma is not None else 0.0, name=name,
                **_options(cfg, "tucker2"))
    return Fit([r.U, r.core, r.V], r.rel_error, list(r.history), _diagnostics(r))


def _cp_factors(r, layout):
    return [r.A, r.B, r.C] if layout == "cp3" else [r.A, r.B, r.C, r.E]


def _cp(layout):
    def solve(weight, sigma, ranks, cfg: MethodConfig, name):
        from .solvers.stable_cp import balance, sensitivity

        r = cp_als(weight, sigma, int(ranks), layout=layout, max_iter=cfg.max_iter, tol=cfg.tol,
                   seed=cfg.seed, damping=cfg.damping_for(layout) if sigma is not None else 0.0, name=name,
                   **_options(cfg, layout))
        factors = _cp_factors(r, layout)
        ss = sensitivity(*balance(*factors))
        return Fit(factors, r.rel_error, list(r.history),
                   {"sensitivity_before": ss, "sensitivity_after": ss, **_diagnostics(r)})

    return solve


def _stable_cp(layout):
    """CP-ALS, then the sensitivity-minimising CPD-EPC at the CP-ALS error (seed 000)."""

    def solve(weight, sigma, ranks, cfg: MethodConfig, name):
        from .solvers.stable_cp import stable_cp

        opts = _options(cfg, f"{layout}-stable")
        damping = cfg.damping_for(layout) if sigma is not None else 0.0
        init = cp_als(weight, sigma, int(ranks), layout=layout, max_iter=cfg.max_iter, tol=cfg.tol,
                      seed=cfg.seed, damping=damping, name=name, **_options(cfg, layout))
        r = stable_cp(weight, sigma, int(ranks), layout=layout, init=init, damping=damping,
                      max_sweeps=opts.get("max_sweeps", 30), tol=opts.get("sweep_tol", 1e-3),
                      direct_max=opts.get("direct_max", 1024), finish=opts.get("finish", "channel"),
                      name=name)
        return Fit(_cp_factors(r, layout), r.rel_error, list(r.history),
                   {"sensitivity_before": float(r.sensitivity_before),
                    "sensitivity_after": float(r.sensitivity_after),
                    "cp_als_error": float(init.rel_error), **_diagnostics(r)})

    return solve


def _groups_of(weight, sigma):
    return sigma.shape[0] if sigma is not None and sigma.dim() == 3 else None


def _lrs_sigma(sigma, damping: float = 0.0):
    """Squeeze a single group's ``(1, D, D)`` covariance to ``(D, D)``, damped by
    ``damping * mean(diag) * I`` per group (the metric of the held-out comparison of the
    ``select`` option; the solvers damp their own Sigma with the same rule)."""
    if sigma is None:
        return None
    if damping > 0:
        diag = torch.diagonal(sigma, dim1=-2, dim2=-1)
        eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
        sigma = sigma + damping * diag.mean(-1)[..., None, None] * eye
    if sigma.dim() == 3 and sigma.shape[0] == 1:
        return sigma[0]
    return sigma


def _lrs_info(res) -> dict:
    return {"rank": list(res.rank), "nnz": int(res.nnz), "bytes": int(res.nbytes()),
            "lowrank": res.lowrank, **_diagnostics(res)}


def relative_sigma_error(weight, approx, sigma) -> float:
    """Relative ``sum_g trace(E_g Sigma_g E_g^T) / sum_g trace(W_g Sigma_g W_g^T)``, ``E = W - W~``;
    ``sigma`` ``(D, D)`` or ``(g, D_g, D_g)``, the weights grouped along their first dim."""
    g = 1 if sigma.dim() == 2 else sigma.shape[0]
    s3 = sigma if sigma.dim() == 3 else sigma[None]
    W = weight.to(torch.float64).reshape(g, weight.shape[0] // g, -1)
    E = W - approx.to(torch.float64).reshape(W.shape)
    num = sum(torch.trace(E[i] @ s3[i] @ E[i].T) for i in range(g))
    den = sum(torch.trace(W[i] @ s3[i] @ W[i].T) for i in range(g))
    return float(num / den) if den > 0 else 0.0


def _lrs(weight, sigma, budget, cfg: MethodConfig, name):
    """Low-rank + sparse at a storage budget (4-byte units): the split between rank and
    nonzeros is ``options['sparsity']`` (the fraction of the budget spent on the sparse part's
    values and indices) or, by default, the split with the lowest Sigma error
    (:func:`ddtd.solvers.lrs.split_budget`), refitted with ``max_iter`` rounds."""
    from .solvers import lrs as L

    opts = _options(cfg, "lrs")
    kw = {k: opts[k] for k in ("mode", "init", "lowrank", "candidates", "switch_tol") if k in opts}
    iters = int(opts.get("iters", min(cfg.max_iter, 10)))
    groups = opts.get("groups")
    sig = _lrs_sigma(sigma)
    extra = {"groups": groups} if groups else {}
    kw["damping"] = cfg.damping_for("lrs") if sigma is not None else 0.0
    lowrank = kw.pop("lowrank", "svd")
    sparsity = opts.get("sparsity")
    budget = int(budget)
    T = weight.shape[0]
    D = int(math.prod(weight.shape[1:]))
    if sparsity is None and opts.get("select") is not None:
        # split chosen by the error on held-out images (the calibration error of a sparse part
        # solved exactly in Sigma is optimistic where samples are few per input dimension)
        sig_fit = _lrs_sigma(opts["select"][0])          # the solver damps it (kw["damping"])
        sig_held = _lrs_sigma(opts["select"][1], cfg.damping_for("lrs"))
        split_iter = int(opts.get("split_iter", 3))
        best = None
        for f in opts.get("fractions", (0.0, 0.25, 0.5, 0.75, 1.0)):
            try:
                rank, nnz, res, _ = L.split_budget(weight, sig_fit, budget, lowrank=lowrank, name=name,
                                                   fractions=(f,), max_iter=split_iter, **extra, **kw)
            except InputError:
                continue
            e = relative_sigma_error(weight, res.kernel().reshape(weight.shape), sig_held)
            if best is None or e < best[0]:
                best = (e, rank, nnz)
        _, rank, nnz = best
        res = L.lowrank_sparse(weight, sig, rank, nnz, lowrank=lowrank, max_iter=iters, name=name,
                               **extra, **{"init": "data", **kw})
    elif sparsity is None:
        split_iter = int(opts.get("split_iter", 3))
        rank, nnz, res, _ = L.split_budget(weight, sig, budget, lowrank=lowrank, name=name,
                                           max_iter=split_iter, **extra, **kw)
        if iters > split_iter:  # refit the chosen split longer (from the data start unless told)
            refit = L.lowrank_sparse(weight, sig, rank, nnz, lowrank=lowrank, max_iter=iters, name=name,
                                     **extra, **{"init": "data", **kw})
            res = refit if refit.rel_error <= res.rel_error else res
    else:
        if not 0.0 <= float(sparsity) <= 1.0:
            raise InputError(f"layer '{name}': sparsity {sparsity} outside [0, 1]",
                             hint="--sparsity is the fraction of each layer's bytes given to the sparse part")
        nnz = min(int(float(sparsity) * budget) // (1 + L.INDEX_UNITS), T * D)
        rest = budget - nnz * (1 + L.INDEX_UNITS)
        g = groups or _groups_of(weight, sig) or 1
        per_rank = L.lowrank_params(tuple(weight.shape), "svd", 1, groups=g)
        cap = min(T, D) if weight.dim() == 4 and weight.shape[1] == 1 else min(T // g, D)
        rank = max(0, min(int(rest // max(1, per_rank)), cap))
        res = L.lowrank_sparse(weight, sig, rank, nnz, lowrank="svd", max_iter=iters, name=name,
                               **extra, **kw)
    return Fit([res], res.rel_error, list(res.history), _lrs_info(res))


def _sparse(weight, sigma, budget, cfg: MethodConfig, name):
    """Pruning only, at a storage budget: the Frobenius norm keeps the largest weights
    (magnitude pruning), the Sigma norm keeps the largest ``|W_ij| sqrt(Sigma_jj)`` and re-solves
    the kept values in the Sigma metric."""
    from .solvers import lrs as L

    opts = _options(cfg, "sparse")
    T = weight.shape[0]
    D = int(math.prod(weight.shape[1:]))
    nnz = min(int(budget) // (1 + L.INDEX_UNITS), T * D)
    extra = {"groups": opts["groups"]} if opts.get("groups") else {}
    fn = L.sigma_prune if sigma is not None else L.magnitude_prune
    res = fn(weight, _lrs_sigma(sigma), nnz, name=name, **extra,
             damping=cfg.damping_for("sparse") if sigma is not None else 0.0)
    return Fit([res], res.rel_error, list(res.history), _lrs_info(res))


METHODS: dict[str, Method] = {
    "svd": Method("svd", _svd, False, "W ~ A B (conv with the original kernel to r channels, then 1x1)"),
    "tucker2": Method("tucker2", _tucker2, True, "1x1 to R2, k x k R2 -> R1, 1x1 to T"),
    "cp3": Method("cp3", _cp("cp3"), True, "1x1 to R, depthwise k x k, 1x1 to T"),
    "cp4": Method("cp4", _cp("cp4"), True, "1x1 to R, depthwise k x 1, depthwise 1 x k, 1x1 to T"),
    "cp3-stable": Method("cp3-stable", _stable_cp("cp3"), True,
                         "cp3 of minimal sensitivity at the CP-ALS error (robust to rounding)", kind="cp3"),
    "cp4-stable": Method("cp4-stable", _stable_cp("cp4"), True,
                         "cp4 of minimal sensitivity at the CP-ALS error (robust to rounding)", kind="cp4"),
    "lrs": Method("lrs", _lrs, False, "low rank + sparse (values + int32 indices), same bytes as svd",
                  kind="lrs", sizing="budget"),
    "sparse": Method("sparse", _sparse, False, "pruning only (values + int32 indices), same bytes as svd",
                     kind="lrs", sizing="budget"),
}
#: what ``method="auto"`` compares per layer (lowest Sigma error at the allocated size); CP
#: layers it picks are then made stable (``cp3-stable`` / ``cp4-stable``) unless
#: ``options['stabilize']`` is False, and ``lrs`` joins when the budget is parameters (it saves
#: bytes, not multiply-adds).
AUTO_METHODS = ("svd", "tucker2", "cp3", "cp4")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}", hint=f"use one of {sorted(METHODS)} or auto")
    return METHODS[name]


def params_of(method: str, layer: nn.Module, ranks) -> int:
    """Weights of ``layer`` replaced by ``method`` at ``ranks`` (all groups); a budget-sized
    method's ``ranks`` is its storage budget."""
    m = get_method(method)
    if m.sizing == "budget":
        return int(ranks)
    T, S, kh, kw, g = layer_dims(layer)
    return g * param_count(m.kind, T // g, S, kh, kw, ranks)


def dense_params_of(layer: nn.Module) -> int:
    return layer.weight.numel()


def with_norm(cfg: MethodConfig, norm: str) -> MethodConfig:
    return replace(cfg, norm=norm)


def sigma_for(cfg: MethodConfig, sigma: torch.Tensor | None):
    """The metric a solver sees: the covariance (Sigma norm) or ``None`` (Frobenius)."""
    return sigma if cfg.norm == "sigma" else None
