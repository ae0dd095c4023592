"""Sensitivity-minimising CP decomposition (CPD-EPC, seed 000) in the Sigma metric.

CP-ALS on conv kernels often drifts to degenerate solutions: a few huge rank-one terms that
nearly cancel.  They reproduce the kernel, but amplify any perturbation of the factors (float16
or int8 rounding, errors arriving from earlier compressed layers).  Among all CP factorizations
whose Sigma error is at most ``delta^2``, CPD-EPC picks one of (locally) minimal *sensitivity*.

Notation (as in :mod:`ddtd.solvers.cp`): modes ``n = 0..N-1`` with factors
``F_0 = A (T x R)``, ``F_1 = B (S x R)``, ``F_2 = C`` (``cp3``: ``kh*kw x R``; ``cp4``:
``kh x R``), ``F_3 = E (kw x R, cp4)``; sizes ``I_n``; ``M`` = Khatri-Rao product of the input
factors (``D x R``, unfold order), ``W~ = A M^T``; ``w_{n,r} = ||F_n[:, r]||^2``.

**Sensitivity** (seed 000, "Solution Sensitivity"; ``ss = lim 1/sigma^2 E||T - T(F + dF)||_F^2``
for i.i.d. ``N(0, sigma^2)`` perturbations ``dF`` of all factor entries; the seed's definition
divides by ``R`` as well, its closed form -- used here -- does not)::

    ss = sum_n  I_n  sum_r  prod_{m != n} w_{m,r}

(for CP3: ``ss = K tr((A^T A)*(B^T B)) + I tr((B^T B)*(C^T C)) + J tr((A^T A)*(C^T C))``.)
Perturbing factor ``n`` by ``dF_n`` changes the tensor by ``sum_r dF_n[:, r] o (other columns)``,
whose expected squared norm is ``sigma^2 I_n sum_r prod_{m != n} w_{m,r}``: the size ``I_n`` is
that of the *perturbed* mode, the product runs over the *other* modes.  ``ss`` is not invariant
to moving scale between the columns of one rank-one term; :func:`balance` applies the optimal
rescaling (closed form: ``w_{n,r} = c_r I_n``), which leaves ``W~`` unchanged.

**Problem**: ``min ss  s.t.  err(W~) = trace((W - W~) Sigma (W - W~)^T) <= delta^2``
(``Sigma = I`` for ``sigma=None``), by default ``delta^2`` = the error of the start (the CP-ALS
solution).  Block coordinate descent over the factors; with the other factors fixed:

* ``ss = sum_r d_r w_{n,r} + const``, ``d_r = sum_{m != n} I_m prod_{l not in {m, n}} w_{l,r}``:
  a squared norm of the free factor with diagonal weights (``||F_n diag(d)^{1/2}||^2``).
* ``err`` is quadratic in the free factor ``X`` (current value ``X0``, current error ``c0``)::

      err(X) = c0 - 2 <g, X - X0> + vec(X - X0)^T N vec(X - X0)

  - ``A``: rows decouple, ``N = I_T (x) G``, ``G = M^T Sigma M`` (``R x R``),
    ``g = (W - A M^T) Sigma M``.
  - an input factor ``F_k`` (Sigma metric): ``M`` is linear in ``F_k``; ``g = c_k(Sigma (W - A M^T)^T
    A)`` and ``N[(i,r),(j,q)] = (A^T A)[r,q] (M_k^T Sigma_{ij} M_k)[r,q]`` (``n_k R x n_k R``; ``M_k``
    the Khatri-Rao of the other input factors, ``Sigma_{ij}`` the block of Sigma between inputs
    with ``i_k = i`` and ``i_k = j``; ``c_k`` as in :mod:`ddtd.solvers.cp`).  Sigma couples the
    rows of ``F_k``, so this is one ``n_k R`` problem.  When ``n_k R > direct_max`` the rows of
    ``F_k`` are split into blocks of ``floor(direct_max / R)`` rows, each block solved exactly
    with the others fixed (still an exact, feasible, monotone block-coordinate step).
  - an input factor with ``sigma=None``: ``N = I_{n_k} (x) (A^T A * Hadamard_{l != k} F_l^T F_l)``.

* The subproblem ``min sum d_i x_i^2 s.t. err(x) <= delta^2`` (least norm over an ellipsoid) is
  solved exactly by :func:`ellipsoid_least_norm`: with ``u = D^{1/2} x``, ``H = D^{-1/2} N
  D^{-1/2} = V diag(lam) V^T``, ``w = V^T u``, ``h = V^T D^{-1/2} g``, the KKT point for the
  multiplier ``mu`` is ``w(mu) = mu (lam * w0 + h) / (1 + mu lam)`` and ``err(w(mu))`` decreases
  monotonically from ``err(0)`` (``mu = 0``) to the unconstrained minimum (``mu -> inf``); the
  secular equation ``err(w(mu)) = delta^2`` is solved by bisection in ``log mu``, taking the
  feasible end of the final bracket.

Safeguards: every candidate update is checked with the *explicit* error of the new factors and
its sensitivity; it is accepted only if ``err <= delta^2 (1 + 1e-9)`` and ``ss`` did not
increase (otherwise it is shortened toward the current point, which by convexity of both the
constraint and ``ss`` in the free factor eventually satisfies both, or rejected).  So the
constraint holds after every step and the sensitivity history is non-increasing.  All numerics in
float64 (factors are returned in ``dtype``).  Cost per sweep: ``O(D^2 R)`` for the Sigma products
plus ``O((n_k R)^3)`` eigendecompositions of the input-mode blocks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, NumericalError

from ._common import (EPS_REL, F64, _where, check_finite, eigh, prepare_sigma,
                      resolve_device_dtype, sigma_error, split_groups)
from .cp import CPResult, cp_als, khatri_rao

#: accepted updates satisfy ``err <= delta^2 * (1 + FEAS_TOL)``
FEAS_TOL = 1e-9


@dataclass(frozen=True)
class StableCPResult(CPResult):
    """CP factors of minimal sensitivity at bounded Sigma error (a :class:`CPResult`).

    Fields as in :class:`CPResult` (``A (T, R)``, ``B (S, R)``, ``C (kh*kw, R)`` / ``(kh, R)``,
    ``E (kw, R)`` or ``None``; leading group dim for grouped layers), except:

    * the factors are *balanced* (column norms chosen to minimise ``ss``, see :func:`balance`),
      not unit-normalised: ``A`` does not carry all the scale.  ``kernel()`` is unaffected.
    * ``history`` / ``raw_history``: relative squared Sigma error after each sweep (entry 0 = the
      start).  Not monotone: the error rises toward ``delta^2`` while ``ss`` falls; every entry is
      ``<= delta^2 (1 + 1e-9) / trace(W Sigma W^T)``.

    Extra attributes:
        sensitivity_history: ``ss`` of the (balanced) factors after each sweep, entry 0 = the
            balanced start; non-increasing.  Grouped: sum over groups.
        sensitivity_before: ``ss`` of the start after balancing (= ``sensitivity_history[0]``;
            the raw CP-ALS factors, unit-normalised, usually have a larger ``ss``).
        sensitivity_after: ``ss`` of the returned factors.
        delta: the bound ``delta`` (absolute Sigma norm, not squared; grouped: ``sqrt`` of the
            sum of the per-group ``delta_g^2``).
        init_rel_error: relative squared Sigma error of the start.
    """

    sensitivity_history: list = field(default_factory=list)
    sensitivity_before: float = float("nan")
    sensitivity_after: float = float("nan")
    delta: float = float("nan")
    init_rel_error: float = float("nan")


# ----------------------------------------------------------------------------- sensitivity


def _norms2(factors):
    return [(F.to(F64) ** 2).sum(-2) for F in factors]        # each (R,) or (g, R)


def sensitivity(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                E: torch.Tensor | None = None) -> float:
    """Sensitivity ``ss = sum_n I_n sum_r prod_{m != n} ||F_m[:, r]||^2`` of a CP factorization.

    Args:
        A ``(I_0, R)``, B ``(I_1, R)``, C ``(I_2, R)``, E ``(I_3, R)`` or ``None`` (CP3); with a
        leading group dim ``(g, I_n, R)`` the result is the sum over groups.
    For CP3 this is the seed's ``K tr(A'A * B'B) + I tr(B'B * C'C) + J tr(A'A * C'C)``; ``I_n``
    is the size of the perturbed mode, the product runs over the other factors.  Computed in
    float64.
    """
    facs = [A, B, C] + ([E] if E is not None else [])
    return _ss(facs)


def _ss(factors) -> float:
    w = _norms2(factors)
    sizes = [F.shape[-2] for F in factors]
    tot = 0.0
    for n in range(len(factors)):
        p = None
        for m in range(len(factors)):
            if m != n:
                p = w[m].clone() if p is None else p * w[m]
        tot += sizes[n] * float(p.sum())
    return tot


def _weights(factors, n: int) -> torch.Tensor:
    """``d_r = sum_{m != n} I_m prod_{l not in {m,n}} w_{l,r}``: ``ss = sum_r d_r w_{n,r} + const``."""
    w = _norms2(factors)
    R = factors[0].shape[-1]
    d = torch.zeros(R, dtype=F64, device=factors[0].device)
    for m in range(len(factors)):
        if m == n:
            continue
        p = torch.ones(R, dtype=F64, device=d.device)
        for l in range(len(factors)):
            if l not in (m, n):
                p = p * w[l]
        d = d + factors[m].shape[-2] * p
    return d


def balance(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, E: torch.Tensor | None = None):
    """Rescale the columns of each rank-one term to minimise :func:`sensitivity` (``W~`` unchanged).

    For one term with ``w_n = ||F_n[:, r]||^2`` and fixed ``P = prod_n w_n``,
    ``ss_r = P sum_n I_n / w_n`` is minimised under ``prod w_n = P`` by ``w_n = c I_n``,
    ``c = (P / prod_n I_n)^{1/N}`` (computed in log space).  Terms with a zero column (``P = 0``)
    contribute nothing to ``W~`` and are set to zero.  Shapes as in :func:`sensitivity`
    (leading group dim allowed).  Returns the factors in float64 (``E`` is ``None`` for CP3).
    """
    facs = [A, B, C] + ([E] if E is not None else [])
    out = _balance([F.to(F64) for F in facs])
    return tuple(out) + ((None,) if E is None else ())


def _balance(factors):
    N = len(factors)
    w = _norms2(factors)
    sizes = torch.tensor([float(F.shape[-2]) for F in factors], dtype=F64)
    zero = torch.zeros_like(w[0], dtype=torch.bool)
    for x in w:
        zero |= x <= 0
    logw = [torch.log(torch.where(zero, torch.ones_like(x), x)) for x in w]
    logc = (sum(logw) - float(torch.log(sizes).sum())) / N
    out = []
    for n, F in enumerate(factors):
        s = torch.exp(0.5 * (logc + math.log(float(sizes[n])) - logw[n]))
        s = torch.where(zero, torch.zeros_like(s), s)
        out.append(F * s.unsqueeze(-2))
    return out


# ----------------------------------------------------------------------------- subproblem


def ellipsoid_least_norm(d: torch.Tensor, N: torch.Tensor, X0: torch.Tensor, g: torch.Tensor,
                         c0: float, bound: float, *, iters: int = 200):
    """Exact solution of the least-(weighted-)norm problem over an ellipsoid.

    ``min_X  sum_{t,i} d_i X[t,i]^2``  s.t.
    ``q(X) = c0 - 2 <g, X - X0> + sum_t (X - X0)[t] N (X - X0)[t]^T <= bound``.

    Args:
        d: ``(n,)`` positive weights (values below ``1e-14 max(d)`` are floored there).
        N: ``(n, n)`` symmetric PSD Hessian (shared by the ``m`` rows of ``X``).
        X0: ``(m, n)`` current point; g: ``(m, n)`` = ``-grad q(X0) / 2``; c0 = ``q(X0)``.
        bound: the level (``delta^2``).

    Method: ``u = X D^{1/2}``, ``H = D^{-1/2} N D^{-1/2} = V diag(lam) V^T`` (float64 ``eigh``),
    ``w = u V``, ``h = g D^{-1/2} V``; directions with ``lam <= 1e-13 max(lam)`` do not enter
    ``q`` and are set to 0.  KKT: ``w(mu) = mu (lam w0 + h) / (1 + mu lam)``, ``q(w(mu))``
    non-increasing in ``mu``.  If ``q(0) <= bound`` the answer is ``X = 0``; if even
    ``mu = inf`` (the unconstrained minimiser) exceeds ``bound`` that minimiser is returned with
    ``feasible=False``; otherwise the secular equation ``q(w(mu)) = bound`` is bracketed and
    bisected in ``log mu`` (``iters`` steps) and the feasible end of the bracket returned.

    Returns:
        ``(X, q, mu, feasible)``: ``X (m, n)`` float64, its model value ``q``, the multiplier.
    """
    d = d.to(F64)
    d = torch.clamp(d, min=float(d.max()) * 1e-14 if float(d.max()) > 0 else 1e-300)
    Dh = d.sqrt()
    X0 = X0.to(F64).reshape(-1, d.shape[0])
    g = g.to(F64).reshape(-1, d.shape[0])
    H = N.to(F64) / (Dh[:, None] * Dh[None, :])
    lam, V = eigh(0.5 * (H + H.T))
    lmax = float(lam.max()) if lam.numel() else 0.0
    null = lam <= 1e-13 * max(lmax, 0.0)
    lam = torch.where(null, torch.zeros_like(lam), lam)
    w0 = (X0 * Dh) @ V
    h = (g / Dh) @ V
    h = torch.where(null, torch.zeros_like(h), h)
    P = lam * w0 + h

    def at(mu):
        if mu == math.inf:
            return torch.where(null, torch.zeros_like(P), P / torch.where(null, torch.ones_like(lam), lam))
        return mu * P / (1.0 + mu * lam)

    def q(w):
        D_ = w - w0
        return c0 + float((lam * D_ * D_ - 2.0 * h * D_).sum())

    def back(w, mu, feas):
        return (w @ V.T) / Dh, q(w), mu, feas

    w = torch.zeros_like(w0)
    if q(w) <= bound or lmax <= 0:
        return back(w, 0.0, q(w) <= bound)
    winf = at(math.inf)
    if q(winf) > bound:
        return back(winf, math.inf, False)
    pos = lam[~null]
    lo = math.log(1e-30 / lmax)
    hi = math.log(1e30 / float(pos.min()))
    whi = at(math.exp(hi))
    if q(whi) > bound:
        return back(winf, math.inf, True)
    if q(at(math.exp(lo))) <= bound:
        return back(at(math.exp(lo)), math.exp(lo), True)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        wm = at(math.exp(mid))
        if q(wm) <= bound:
            hi, whi = mid, wm
        else:
            lo = mid
        if hi - lo < 1e-15 * max(1.0, abs(hi)):
            break
    return back(whi, math.exp(hi), True)


# ----------------------------------------------------------------------------- solver


def _contract_except(Y, facs, dims, k, rows=None):
    """``c_k(Y)[i, r] = sum_{rows with i_k = i} Y[row, r] prod_{l != k} F_l[i_l, r]``
    (``rows``: restrict ``i`` to these indices)."""
    n = dims[k]
    R = Y.shape[-1]
    Yk = Y.reshape(*dims, R).movedim(k, 0).reshape(n, -1, R)
    if rows is not None:
        Yk = Yk[rows]
    Mk = khatri_rao([facs[l] for l in range(len(dims)) if l != k])
    return (Yk * Mk[None]).sum(1)


class _Group:
    """One group: ``W (T, D)``, ``Sigma (D, D)`` or ``None``, all float64."""

    def __init__(self, W, S, dims, delta2, direct_max, name):
        self.W, self.S, self.dims = W, S, dims
        self.delta2 = delta2
        self.limit = delta2 * (1.0 + FEAS_TOL)
        self.direct_max = direct_max
        self.name = name
        self.WS = W @ S if S is not None else W
        self.base = sigma_error(W, S, F64)
        if S is not None:
            D = S.shape[0]
            self.cols = [S.reshape(D, *dims).movedim(1 + k, 0).reshape(n, D, D // n)
                         for k, n in enumerate(dims)]

    def err(self, factors):
        return sigma_error(self.W - factors[0] @ khatri_rao(factors[1:]).T, self.S, F64)

    def smul(self, X):
        return self.S @ X if self.S is not None else X

    def accept(self, factors, n, Fnew, e, ss):
        """Try ``factors[n] <- Fnew``; shorten toward the current value (``t = 1, 1/2, ...``)
        until the explicit error is ``<= limit`` and ``ss`` did not increase, else keep the
        current factors.  Returns ``(factors, err, ss, accepted)``."""
        if not bool(torch.isfinite(Fnew).all()):
            raise NumericalError(f"{_where(self.name)}: stable CP produced a non-finite factor",
                                 hint="check the weight and sigma, or use a smaller rank")
        Fold = factors[n]
        t = 1.0
        for _ in range(30):
            cand = Fnew if t == 1.0 else Fold + t * (Fnew - Fold)
            trial = list(factors)
            trial[n] = cand
            e2 = self.err(trial)
            s2 = _ss(trial)
            if e2 <= self.limit and s2 <= ss:
                return trial, e2, s2, True
            t *= 0.5
        return factors, e, ss, False


def _sweep(G: _Group, factors, e, ss):
    dims = G.dims
    m = len(dims)
    target = G.delta2 * (1.0 - 1e-10)
    # --- output factor A: rows decouple, N = I (x) M^T Sigma M
    A = factors[0]
    M = khatri_rao(factors[1:])
    SM = G.smul(M)
    Gm = M.T @ SM
    grad = G.WS @ M - A @ Gm
    X, _, _, _ = ellipsoid_least_norm(_weights(factors, 0), Gm, A, grad, e, target)
    factors, e, ss, _ = G.accept(factors, 0, X, e, ss)
    # --- input factors
    for k in range(m):
        n = 1 + k
        A = factors[0]
        facs = factors[1:]
        AtA = A.T @ A
        R = A.shape[1]
        d = _weights(factors, n)
        if G.S is None:
            Gk = AtA.clone()
            for l in range(m):
                if l != k:
                    Gk = Gk * (facs[l].T @ facs[l])
            M = khatri_rao(facs)
            grad = _contract_except(G.W.T @ A - M @ AtA, facs, dims, k)
            X, _, _, _ = ellipsoid_least_norm(d, Gk, facs[k], grad, e, target)
            factors, e, ss, _ = G.accept(factors, n, X, e, ss)
            continue
        nk = dims[k]
        rest = G.W.shape[1] // nk
        Mk = khatri_rao([facs[l] for l in range(m) if l != k])      # (rest, R)
        SWA = G.WS.T @ A                                             # Sigma W^T A (D, R)
        SM = G.S @ khatri_rao(facs)                                  # Sigma M (D, R)
        bs = max(1, min(nk, G.direct_max // R))
        for s0 in range(0, nk, bs):
            rows = torch.arange(s0, min(nk, s0 + bs), device=A.device)
            nb = rows.numel()
            facs = factors[1:]
            F = facs[k]
            grad = _contract_except(SWA - SM @ AtA, facs, dims, k, rows)          # (nb, R)
            Y = torch.matmul(G.cols[k][rows], Mk)                                  # (nb, D, R)
            Yp = Y.reshape(nb, *dims, R).movedim(1 + k, 1).reshape(nb, nk, rest, R)[:, rows]
            Nb = torch.einsum("or,jioq->irjq", Mk, Yp)
            Nm = (Nb * AtA[None, :, None, :]).reshape(nb * R, nb * R)
            x, _, _, _ = ellipsoid_least_norm(d.repeat(nb), Nm, F[rows].reshape(1, -1),
                                              grad.reshape(1, -1), e, target)
            Fnew = F.clone()
            Fnew[rows] = x.reshape(nb, R)
            factors, e, ss, ok = G.accept(factors, n, Fnew, e, ss)
            if ok:
                dF = factors[n][rows] - F[rows]
                SM = SM + torch.einsum("jdr,jr->dr", Y, dF)
    # --- free rescaling of the rank-one terms
    bal = _balance(factors)
    eb, sb = G.err(bal), _ss(bal)
    if eb <= G.limit and sb <= ss:
        factors, e, ss = bal, eb, sb
    return factors, e, ss


def _stable_one(G: _Group, factors, max_sweeps, tol):
    e = G.err(factors)
    ss = _ss(factors)
    bal = _balance(factors)
    eb, sb = G.err(bal), _ss(bal)
    if eb <= max(G.limit, e) and sb <= ss:
        factors, e, ss = bal, eb, sb
    ss_hist, err_hist = [ss], [e]
    converged = False
    it = 0
    for it in range(1, max_sweeps + 1):
        factors, e, ss = _sweep(G, factors, e, ss)
        if not (math.isfinite(ss) and math.isfinite(e)):
            raise NumericalError(f"{_where(G.name)}: stable CP diverged (non-finite at sweep {it})",
                                 hint="check the weight and sigma, or use a smaller rank")
        ss_hist.append(ss)
        err_hist.append(e)
        if ss_hist[-2] - ss <= tol * ss_hist[-2]:
            converged = True
            break
    return factors, e, ss_hist, err_hist, it, converged


def _split_init(init: CPResult, g: int, layout: str, name):
    if not isinstance(init, CPResult):
        raise InputError(f"{_where(name)}: init must be a CPResult, got {type(init).__name__}",
                         hint="pass the result of ddtd.solvers.cp_als, or init=None")
    if init.layout != layout:
        raise InputError(f"{_where(name)}: init has layout {init.layout!r}, expected {layout!r}",
                         hint="pass layout=init.layout")
    if init.groups != g:
        raise InputError(f"{_where(name)}: init has {init.groups} groups, the layer {g}",
                         hint="fit the init with the same groups")
    facs = [init.A, init.B, init.C] + ([init.E] if layout == "cp4" else [])
    for F in facs:
        check_finite(F, "init factor", name)
    if g == 1:
        return [[F for F in facs]]
    return [[F[i] for F in facs] for i in range(g)]


def stable_cp(weight: torch.Tensor, sigma: torch.Tensor | None, rank: int, *,
              layout: str = "cp3", init: CPResult | None = None, delta: float | None = None,
              max_sweeps: int = 100, tol: float = 1e-5, direct_max: int = 1024,
              damping: float = 0.0, eps_rel: float = EPS_REL, cp_options: dict | None = None,
              groups: int | None = None, device=None, dtype: torch.dtype | None = None,
              name: str | None = None) -> StableCPResult:
    """Sensitivity-minimising CP (CPD-EPC) of a conv kernel at bounded Sigma error.

    Solves ``min ss(A, B, C[, E])  s.t.  trace((W - W~) Sigma (W - W~)^T) <= delta^2`` by exact
    factor-wise (block) minimisation, see the module docstring.

    Args:
        weight: ``(T, S, kh, kw)`` kernel (grouped: ``(T, S/g, kh, kw)``); ``W = weight.reshape(T, D)``.
        sigma: ``(D, D)`` input covariance (``(g, D_g, D_g)`` grouped) or ``None`` (Frobenius).
        rank: CP rank ``R`` (per group); must match ``init``.
        layout: ``'cp3'`` or ``'cp4'``.
        init: start (a :class:`CPResult` with this layout, rank and groups); ``None`` runs
            :func:`cp_als` with ``cp_options`` (plus layout, groups, damping, eps_rel, device,
            dtype) first.
        delta: bound on the absolute Sigma-norm error (not squared) of the whole layer; default
            the error of ``init``.  Grouped: ``delta^2`` is split over the groups in proportion
            to their start errors.  Must be at least the start error.
        max_sweeps, tol: stop after ``max_sweeps`` sweeps, or when one sweep lowers ``ss`` by
            less than ``tol`` times its value.
        direct_max: input factors with ``n_k R`` unknowns above this are updated in row blocks
            of ``floor(direct_max / R)`` rows (one ``nb R x nb R`` eigendecomposition each).
        damping, eps_rel: see :func:`ddtd.solvers._common.prepare_sigma` (the constraint uses
            ``Sigma + damping * mean(diag) * I``; ``eps_rel`` only affects the CP-ALS start).
        groups, device, name: as in :func:`cp_als`.  dtype: of the returned factors (the solver
            works in float64; float32 rounding of the factors may move the error by ~1e-7
            relative).

    Returns:
        :class:`StableCPResult` (``rel_error`` recomputed from the returned factors).

    Raises:
        InputError: bad shapes / layout / rank / init, or ``delta`` below the start error.
        NumericalError: NaN / Inf in weight, sigma or init, or a non-finite iterate.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    if layout not in ("cp3", "cp4"):
        raise InputError(f"unknown CP layout {layout!r}", hint="use 'cp3' or 'cp4'")
    if weight.dim() != 4:
        raise InputError(f"{_where(name)}: stable CP needs a conv kernel (T, S, kh, kw), got "
                         f"{tuple(weight.shape)}", hint="use sigma_svd for Linear layers")
    R = int(rank)
    if R < 1:
        raise InputError(f"{_where(name)}: CP rank must be >= 1, got {R}", hint="choose rank >= 1")
    check_finite(weight, "weight", name)
    t0 = time.perf_counter()
    gs = split_groups(weight, sigma, groups, name)
    g = gs.groups
    if init is None:
        opts = dict(cp_options or {})
        init = cp_als(weight, sigma, R, layout=layout, groups=g, damping=damping, eps_rel=eps_rel,
                      device=dev, dtype=dt, name=name, **opts)
    starts = _split_init(init, g, layout, name)
    if init.A.shape[-1] != R:
        raise InputError(f"{_where(name)}: init has rank {init.A.shape[-1]}, expected {R}",
                         hint="pass rank equal to the init's rank")
    T, S, kh, kw = gs.weights[0].shape
    D = S * kh * kw
    dims = (S, kh * kw) if layout == "cp3" else (S, kh, kw)
    probs, facs0, errs0 = [], [], []
    for w, s, st in zip(gs.weights, gs.sigmas, starts):
        W = w.reshape(T, D).to(device=dev, dtype=F64)
        s_obj, _ = prepare_sigma(s, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
        f = [F.to(device=dev, dtype=F64) for F in st]
        shapes = [(T, R)] + [(n, R) for n in dims]
        if [tuple(F.shape) for F in f] != shapes:
            raise InputError(f"{_where(name)}: init factors have shapes "
                             f"{[tuple(F.shape) for F in f]}, expected {shapes}",
                             hint="fit the init on this weight with the same layout and rank")
        probs.append((W, s_obj))
        facs0.append(f)
        errs0.append(sigma_error(W - f[0] @ khatri_rao(f[1:]).T, s_obj, F64))
    e_tot = sum(errs0)
    if delta is None:
        d2s = list(errs0)
    else:
        d2 = float(delta) ** 2
        if not d2 >= e_tot * (1 - 1e-12):
            raise InputError(f"{_where(name)}: delta^2 = {d2:.6g} is below the error of the start "
                             f"({e_tot:.6g})", hint="pass a larger delta, or delta=None")
        if e_tot > 0:
            d2s = [d2 * e / e_tot for e in errs0]
        else:
            bases = [sigma_error(W, s_, F64) for W, s_ in probs]
            d2s = [d2 * b / (sum(bases) or 1.0) for b in bases]
    outs = []
    for (W, s_obj), f, d2 in zip(probs, facs0, d2s):
        G = _Group(W, s_obj, dims, max(d2, 0.0), direct_max, name)
        outs.append((G,) + _stable_one(G, f, max_sweeps, tol))
    bases = [o[0].base for o in outs]
    btot = sum(bases) or 1.0

    def comb(hs):
        n = max(len(h) for h in hs)
        return [sum(h[min(i, len(h) - 1)] for h in hs) for i in range(n)]

    ss_hist = comb([o[3] for o in outs])
    err_hist = [x / btot for x in comb([o[4] for o in outs])]
    fl = [[F.to(dt) for F in o[1]] for o in outs]
    final_err = sum(o[0].err([F.to(F64) for F in f]) for o, f in zip(outs, fl))
    nF = len(fl[0])
    stacked = [fl[0][i] if g == 1 else torch.stack([f[i] for f in fl]) for i in range(nF)]
    return StableCPResult(
        layout=layout, A=stacked[0], B=stacked[1], C=stacked[2],
        E=stacked[3] if layout == "cp4" else None, kernel_size=(kh, kw),
        rel_error=final_err / btot, history=err_hist, raw_history=list(err_hist),
        n_iter=max(o[5] for o in outs), converged=all(o[6] for o in outs),
        seconds=time.perf_counter() - t0, groups=g,
        sensitivity_history=ss_hist, sensitivity_before=ss_hist[0],
        sensitivity_after=sum(_ss([F.to(F64) for F in f]) for f in fl),
        delta=math.sqrt(sum(d2s)), init_rel_error=e_tot / btot)


def stable_cp3(weight, sigma, rank, **kw) -> StableCPResult:
    """:func:`stable_cp` with ``layout='cp3'``."""
    return stable_cp(weight, sigma, rank, layout="cp3", **kw)


def stable_cp4(weight, sigma, rank, **kw) -> StableCPResult:
    """:func:`stable_cp` with ``layout='cp4'``."""
    return stable_cp(weight, sigma, rank, layout="cp4", **kw)
