"""Sensitivity-minimising CP decomposition (CPD-EPC) in the Sigma metric.

Reference: A.-H. Phan, K. Sobolev, K. Sozykin, D. Ermilov, J. Gusak, P. Tichavsky, V. Glukhov, I. Oseledets, A. Cichocki, "Stable low-rank tensor decomposition for compression of convolutional neural network", ECCV 2020 (below: "the paper").

CP-ALS on conv kernels often drifts to degenerate solutions: a few huge rank-one terms that
nearly cancel.  They reproduce the kernel, but amplify any perturbation of the factors (float16
or int8 rounding, errors arriving from earlier compressed layers).  Among all CP factorizations
whose Sigma error is at most ``delta^2``, CPD-EPC picks one of (locally) minimal *sensitivity*.

Notation (as in :mod:`ddtd.solvers.cp`): modes ``n = 0..N-1`` with factors
``F_0 = A (T x R)``, ``F_1 = B (S x R)``, ``F_2 = C`` (``cp3``: ``kh*kw x R``; ``cp4``:
``kh x R``), ``F_3 = E (kw x R, cp4)``; sizes ``I_n``; ``M`` = Khatri-Rao product of the input
factors (``D x R``, unfold order), ``W~ = A M^T``; ``w_{n,r} = ||F_n[:, r]||^2``.

**Sensitivity** (the paper, "Solution Sensitivity"; ``ss = lim 1/sigma^2 E||T - T(F + dF)||_F^2``
for i.i.d. ``N(0, sigma^2)`` perturbations ``dF`` of all factor entries; the paper's definition
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
    rows of ``F_k``, so this is one ``n_k R`` problem, solved exactly when ``n_k R <= direct_max``.
    Otherwise the rows are updated one at a time (Gauss-Seidel, the other rows fixed; every row
    step is exact for its own model, feasible and monotone):

    - ``rows='majorize'`` (default for modes with more than ``exact_rows`` rows): row ``i`` uses
      the majorised Hessian ``alpha_i K >= N_ii``, ``K = A^T A * (M_k^T Sbar M_k)``, where
      ``Sbar`` is the mean of the trace-normalised diagonal blocks and ``alpha_i`` the largest
      generalised eigenvalue of ``(Sigma_ii, Sbar)`` (Schur product theorem).  One ``R x R``
      eigendecomposition serves all rows; the row step is the least-norm point of the smaller
      ellipsoid, and the error is then updated with the exact ``N_ii`` (the unused slack carries
      over to the next rows).  Cost ``O(R^2)`` per row plus the ``Sigma dM`` updates.
    - ``rows='exact'``: an ``R x R`` eigendecomposition per row (``n_k R^3``).
    - ``rows='block'``: exact blocks of ``floor(direct_max / R)`` rows (the original scheme,
      ``n_k / nb`` eigendecompositions of size ``nb R``: slow for wide layers).
  - an input factor with ``sigma=None``: ``N = I_{n_k} (x) (A^T A * Hadamard_{l != k} F_l^T F_l)``.

* The subproblem ``min sum d_i x_i^2 s.t. err(x) <= delta^2`` (least norm over an ellipsoid) is
  solved exactly by :func:`ellipsoid_least_norm`: with ``u = D^{1/2} x``, ``H = D^{-1/2} N
  D^{-1/2} = V diag(lam) V^T``, ``w = V^T u``, ``h = V^T D^{-1/2} g``, the KKT point for the
  multiplier ``mu`` is ``w(mu) = mu (lam * w0 + h) / (1 + mu lam)`` and ``err(w(mu))`` decreases
  monotonically (and convexly) from ``err(0)`` (``mu = 0``) to the unconstrained minimum
  (``mu -> inf``); the secular equation ``err(w(mu)) = delta^2`` is solved by a safeguarded
  Newton iteration (log-grid bracket or a warm start from the previous row), on ``O(R)`` row
  sums, returning a feasible ``mu``.

Sweep: each input factor, each followed by the (cheap, exact) ``A`` step, then the optimal
rescaling (:func:`balance`), then an *extrapolation* (``F_k + beta (F_k - F_k^prev)`` for the
input factors, ``A`` re-solved exactly, balanced; kept only if feasible with lower ``ss``,
``beta`` adapted), which speeds up the slow block-coordinate progress about 2x per sweep.

Safeguards: ``Sigma M`` is kept current by low-rank updates and the error is tracked exactly
through each step's quadratic (``err(X0 + t dX) = c0 - 2 t <g, dX> + t^2 <dX, N dX>``, with
``N dX`` computed from the actual ``Sigma dM``); each step is shortened to the largest ``t <= 1``
with ``err <= delta^2`` and no increase of ``ss`` (both convex in ``t``).  So the constraint holds
after every step and the sensitivity history is non-increasing.  Every ``verify_every`` sweeps
and at the end the error is recomputed from the explicit residual with a fresh ``Sigma M``; if
it ever exceeded ``delta^2 (1 + 1e-9)`` (rounding drift, not seen in practice) the last verified
iterate is returned.  All numerics in float64 (factors are returned in ``dtype``).  Cost per
sweep: about ``(m + 1)`` products ``Sigma dM`` (``2 D^2 R`` flops each, ``m`` input factors) plus
``O(T D R)`` products and a few ``R x R`` eigendecompositions; ``max_gflop`` caps the number of
sweeps for wide layers (a 512 -> 512 3x3 conv at ``R = 285`` is ~50 GFLOP per sweep).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ddtd.errors import InputError, layer_label, NumericalError

from ._common import (EPS_REL, F64, check_finite, default_damping, eigh, prepare_sigma,
                      resolve_device_dtype, sigma_error, split_groups, spd_solve)
from .cp import CPResult, cp_als, khatri_rao, with_info

#: accepted updates satisfy ``err <= delta^2 * (1 + FEAS_TOL)``
FEAS_TOL = 1e-9


@dataclass(frozen=True)
class StableCPResult(CPResult):
    """CP factors of minimal sensitivity at bounded Sigma error (a :class:`CPResult`).

    Fields as in :class:`CPResult` (``A (T, R)``, ``B (S, R)``, ``C (kh*kw, R)`` / ``(kh, R)``,
    ``E (kw, R)`` or ``None``; leading group dim for grouped layers), except:

    * the factors are *balanced* (column norms chosen to minimise ``ss``, see :func:`balance`),
      not unit-normalised: ``A`` does not carry all the scale.  ``kernel()`` is unaffected.
    * ``history`` / ``raw_history``: relative squared Sigma error (``Sigma`` damped as asked):
      entry 0 the start, entry ``i`` the iterate after sweep ``i``, and one more, last entry:
      the error of the returned factors (after the ``finish`` step, rounded to ``dtype``;
      ``= rel_error``, float64 from the explicit residual).  Not monotone: the error rises
      toward ``delta^2`` while ``ss`` falls (the monotone quantity is
      ``sensitivity_history``); every sweep entry is
      ``<= (delta^2 (1 + 1e-9) + 1e-15 trace(W Sigma W^T)) / trace(W Sigma W^T)``, and the
      finish can only lower the error (the last entry may exceed the bound by the rounding to
      ``dtype``, ~1e-7 relative for float32).

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
    For CP3 this is the paper's ``K tr(A'A * B'B) + I tr(B'B * C'C) + J tr(A'A * C'C)``; ``I_n``
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
    return [F * s for F, s in zip(factors, _balance_scales(factors))]


def _balance_scales(factors):
    """Per-factor column scales (each ``(R,)`` or ``(g, R)``) of :func:`balance`."""
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
        out.append(torch.where(zero, torch.zeros_like(s), s).unsqueeze(-2))
    return out


# ----------------------------------------------------------------------------- subproblem


def _secular(lam, H2, HW, W2, c0: float, bound: float, mu0: float | None = None,
             iters: int = 60, rtol: float = 0.0):
    """Multiplier ``mu`` of the least-norm problem in the eigenbasis (see :func:`ellipsoid_least_norm`).

    numpy float64 vectors: ``lam (n,) >= 0`` (null directions exactly 0, with ``H2 = HW = 0``
    there) and ``H2, HW, W2`` the row sums of ``h^2, h w0, w0^2``.  With ``b = 1 / (1 + mu lam)``,
    ``a = mu b`` the KKT point is ``w = (1 - b) w0 + a h`` and
    ``q(mu) = c0 - sum a (1 + b) H2 - 2 b^2 HW + lam b^2 W2`` is convex and non-increasing in
    ``mu``, ``q'(mu) = -2 sum b^3 (lam^2 W2 + 2 lam HW + H2)``.  Safeguarded Newton on
    ``q(mu) = bound`` inside a bracket ``[lo, hi]`` (``q(lo) > bound >= q(hi)``), started at
    ``mu0`` (a warm start) or on a log grid.  Returns ``(mu, q(mu), feasible)``; ``mu`` may be
    ``0`` (``q(0) <= bound``) or ``inf`` (the unconstrained minimiser); the returned ``mu`` is
    always on the feasible side when ``feasible``.
    """
    pos = lam > 0
    q0 = c0 + float((2.0 * HW + lam * W2).sum())
    if q0 <= bound:
        return 0.0, q0, True
    if not pos.any():
        return math.inf, c0, c0 <= bound
    lp = lam[pos]
    qinf = c0 - float((H2[pos] / lp).sum())
    if qinf > bound:
        return math.inf, qinf, False
    PP = lam * lam * W2 + 2.0 * lam * HW + H2
    tol = 1e-13 * max(abs(bound), abs(c0), 1e-300)
    C1 = 2.0 * HW + lam * W2
    rtol = rtol * (q0 - qinf)

    def qd(mu):
        b = 1.0 / (1.0 + mu * lam)
        bb = b * b
        q = c0 + float(bb @ C1 - (mu * b * (1.0 + b)) @ H2)
        return q, 2.0 * float((bb * b) @ PP)                # q and -q'

    lo, hi, qhi = 0.0, math.inf, qinf
    if mu0 is not None and 0.0 < mu0 < math.inf:
        mu = float(mu0)
    else:
        mus = np.logspace(math.log10(1e-12 / float(lp.max())), math.log10(1e12 / float(lp.min())), 40)
        b = 1.0 / (1.0 + mus[:, None] * lam)
        bb = b * b
        qs = c0 + (-(mus[:, None] * b * (1.0 + b)) * H2 + 2.0 * bb * HW + lam * bb * W2).sum(1)
        ok = np.nonzero(qs <= bound)[0]
        if ok.size == 0:                # root beyond mu lam_min = 1e12: take the minimiser
            return math.inf, qinf, True
        j = int(ok[0])
        hi, qhi = float(mus[j]), float(qs[j])
        lo = float(mus[j - 1]) if j > 0 else 0.0
        mu = lo if lo > 0 else hi * 1e-3
    for _ in range(iters):
        q, s = qd(mu)
        if rtol > 0 and abs(q - bound) <= rtol:      # close enough: the caller enforces the bound
            return mu, q, q <= bound
        if q <= bound:
            hi, qhi = mu, q
            if bound - q <= tol:
                return mu, q, True
        else:
            lo = mu
        if hi < math.inf and hi - lo <= 1e-14 * hi:
            break
        step = (q - bound) / s if s > 0 else math.inf
        new = mu + step
        if q > bound and step <= 1e-14 * mu:
            new = mu + 4.0 * step               # converged from the infeasible side: step past
            if not new < hi:
                break
        if not lo < new < hi:
            if hi == math.inf:
                new = max(lo, mu) * 16.0
            elif lo == 0.0:
                new = hi / 16.0
            else:
                new = math.sqrt(lo * hi)
        mu = new
    if hi == math.inf:
        return math.inf, qinf, True
    return hi, qhi, True


def _basis_solve(lam, V, Dh, X0, g, c0, bound, iters=60, mu0=None):
    """Least-norm step in the eigenbasis ``H = V diag(lam) V^T`` of ``D^{-1/2} N D^{-1/2}``
    (``lam`` with null directions zeroed).  Returns ``(X, q, mu, feasible)``."""
    w0 = (X0 * Dh) @ V
    h = (g / Dh) @ V
    h = torch.where(lam > 0, h, torch.zeros_like(h))
    mu, qv, feas = _secular(*[x.cpu().numpy() for x in (lam, (h * h).sum(0), (h * w0).sum(0),
                                                        (w0 * w0).sum(0))],
                            c0, bound, mu0, iters)
    if mu == math.inf:
        pos = lam > 0
        a = torch.where(pos, 1.0 / torch.where(pos, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        b = torch.where(pos, torch.zeros_like(lam), torch.ones_like(lam))
    else:
        b = 1.0 / (1.0 + mu * lam)
        a = mu * b
    w = (1.0 - b) * w0 + a * h
    return (w @ V.T) / Dh, qv, mu, feas


def _null_cut(lam):
    lmax = float(lam.max()) if lam.numel() else 0.0
    return torch.where(lam <= 1e-13 * max(lmax, 0.0), torch.zeros_like(lam), lam)


def _floor_d(d):
    d = d.to(F64)
    m = float(d.max()) if d.numel() else 0.0
    return torch.clamp(d, min=m * 1e-14 if m > 0 else 1e-300)


def ellipsoid_least_norm(d: torch.Tensor, N: torch.Tensor, X0: torch.Tensor, g: torch.Tensor,
                         c0: float, bound: float, *, iters: int = 60):
    """Exact solution of the least-(weighted-)norm problem over an ellipsoid.

    ``min_X  sum_{t,i} d_i X[t,i]^2``  s.t.
    ``q(X) = c0 - 2 <g, X - X0> + sum_t (X - X0)[t] N (X - X0)[t]^T <= bound``.

    Args:
        d: ``(n,)`` positive weights (values below ``1e-14 max(d)`` are floored there).
        N: ``(n, n)`` symmetric PSD Hessian (shared by the ``m`` rows of ``X``).
        X0: ``(m, n)`` current point; g: ``(m, n)`` = ``-grad q(X0) / 2``; c0 = ``q(X0)``.
        bound: the level (``delta^2``).
        iters: at most this many Newton steps on the secular equation.

    Method: ``u = X D^{1/2}``, ``H = D^{-1/2} N D^{-1/2} = V diag(lam) V^T`` (float64 ``eigh``),
    ``w = u V``, ``h = g D^{-1/2} V``; directions with ``lam <= 1e-13 max(lam)`` do not enter
    ``q`` and are set to 0.  KKT: ``w(mu) = mu (lam w0 + h) / (1 + mu lam)``, ``q(w(mu))``
    convex and non-increasing in ``mu``, and it only depends on the row sums of ``h^2, h w0,
    w0^2`` (``O(n)`` per evaluation, whatever ``m``).  If ``q(0) <= bound`` the answer is
    ``X = 0``; if even ``mu = inf`` (the unconstrained minimiser) exceeds ``bound`` that
    minimiser is returned with ``feasible=False``; otherwise the secular equation
    ``q(w(mu)) = bound`` is bracketed on a log grid and solved by Newton's method from the
    infeasible side, returning the first feasible iterate.

    Returns:
        ``(X, q, mu, feasible)``: ``X (m, n)`` float64, its model value ``q``, the multiplier.
    """
    d = _floor_d(d)
    Dh = d.sqrt()
    X0 = X0.to(F64).reshape(-1, d.shape[0])
    g = g.to(F64).reshape(-1, d.shape[0])
    H = N.to(F64) / (Dh[:, None] * Dh[None, :])
    lam, V = eigh(0.5 * (H + H.T))
    return _basis_solve(_null_cut(lam), V, Dh, X0, g, c0, bound, iters)


def _step_len(e0: float, lin: float, quad: float, bound: float, nl: float, nq: float) -> float:
    """Largest ``t`` in ``[0, 1]`` with ``e0 - 2 t lin + t^2 quad <= max(bound, e0)`` and
    ``2 t nl + t^2 nq <= 0`` (the error stays within the bound, the sensitivity does not grow)."""
    if not nq > 0:
        return 0.0
    if nl >= 0:
        return 0.0
    t = min(1.0, -2.0 * nl / nq)
    s = max(bound - e0, 0.0)
    if quad * t * t - 2.0 * lin * t > s:
        if quad > 0:
            sq = math.sqrt(max(lin * lin + quad * s, 0.0))
            t = min(t, (lin + sq) / quad if lin >= 0 else s / (sq - lin))
        elif lin < 0:               # quad <= 0 only by rounding
            t = min(t, s / (-2.0 * lin))
    return max(t, 0.0)


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
    """One group: ``W (T, D)``, ``Sigma (D, D)`` or ``None``, all float64, and the solver state
    (``facs``: the factors; ``SM = Sigma M`` kept current by low-rank updates; ``e``: the Sigma
    error, tracked exactly through each step's quadratic; ``ss``)."""

    def __init__(self, W, S, dims, delta2, direct_max, rows, exact_rows, name):
        self.W, self.S, self.dims = W, S, dims
        self.direct_max = direct_max
        self.rows, self.exact_rows = rows, exact_rows
        self.name = name
        self.WS = W @ S if S is not None else W
        self.base = sigma_error(W, S, F64)
        self.set_delta(delta2)
        D = W.shape[1]
        self.idx = [torch.arange(D, device=W.device).reshape(*dims).movedim(k, 0).reshape(n, -1)
                    for k, n in enumerate(dims)]
        self._maj = {}
        self.facs, self.SM, self.e, self.ss = None, None, math.nan, math.nan

    # --- explicit quantities
    def fresh(self, facs):
        """``(err, Sigma M)`` recomputed from scratch (``err`` from the residual ``W - A M^T``)."""
        M = khatri_rao(facs[1:])
        res = self.W - facs[0] @ M.T
        if self.S is None:
            return float((res * res).sum()), None
        SM = self.S @ M
        return float(((self.WS - facs[0] @ SM.T) * res).sum()), SM

    def start(self, facs):
        self.facs = list(facs)
        self.e, self.SM = self.fresh(self.facs)
        self.ss = _ss(self.facs)

    def set_delta(self, delta2):
        """The bound; ``limit`` (what is accepted) allows ``1e-15 * base`` of rounding on top of
        the relative ``FEAS_TOL`` (matters only for exact fits, ``delta ~ 0``)."""
        self.delta2 = delta2
        self.limit = delta2 * (1.0 + FEAS_TOL) + 1e-15 * self.base
        self.target = delta2 * (1.0 - 1e-10)

    def cols(self, k, cidx, r0, r1):
        """``Sigma[:, cidx]`` for the rows ``r0:r1`` of mode ``k`` (a view for the slowest mode)."""
        if k == 0:
            rest = self.idx[0].shape[1]
            return self.S[:, r0 * rest:r1 * rest]
        return self.S.index_select(0, cidx).T          # Sigma symmetric: gather whole rows

    def majorizer(self, k):
        """``(Sbar, alpha)`` with ``Sigma_ii <= alpha_i Sbar`` (Loewner order) for the diagonal
        blocks ``Sigma_ii`` (inputs with ``i_k = i``) of mode ``k``; ``Sbar`` = the mean of the
        trace-normalised blocks.  Computed once per mode."""
        if k not in self._maj:
            idx = self.idx[k]
            n, rest = idx.shape
            Sb = self.S[idx[:, :, None], idx[:, None, :]]
            Sb = 0.5 * (Sb + Sb.transpose(1, 2))
            tr = torch.diagonal(Sb, dim1=1, dim2=2).sum(-1)
            live = tr > 0
            eye = torch.eye(rest, dtype=F64, device=Sb.device)
            Sbar = (Sb[live] / tr[live, None, None]).mean(0) if bool(live.any()) else eye / rest
            Sbar = 0.5 * (Sbar + Sbar.T)
            ridge = 1e-12 * float(torch.trace(Sbar)) / rest
            while True:                 # Sbar is PD unless every block misses a direction
                L, info = torch.linalg.cholesky_ex(Sbar + ridge * eye)
                if int(info) == 0:
                    break
                ridge *= 100.0
            Sbar = Sbar + ridge * eye
            Z = torch.linalg.solve_triangular(L, Sb, upper=False)
            Z = torch.linalg.solve_triangular(L, Z.transpose(1, 2), upper=False)
            alpha = torch.linalg.eigvalsh(0.5 * (Z + Z.transpose(1, 2)))[:, -1].clamp_min(0)
            self._maj[k] = (Sbar, alpha * (1.0 + 1e-9))
        return self._maj[k]

    # --- updates
    def apply(self, n, rows, dF, lin, quad, dSM=None, t=1.0):
        """``facs[n][rows] += t dF`` with the exact error change ``-2 t lin + t^2 quad``."""
        F = self.facs[n].clone()
        if rows is None:
            F += t * dF
        else:
            F[rows] += t * dF
        self.facs[n] = F
        self.e = self.e - 2.0 * t * lin + t * t * quad
        if dSM is not None:
            self.SM = self.SM + t * dSM


def _move(d, F0, dF):
    """``(nl, nq)``: the change of ``sum_r d_r ||F_{:, r}||^2`` along ``F0 + t dF`` is ``2 t nl + t^2 nq``."""
    return float((d * (F0 * dF).sum(0)).sum()), float((d * (dF * dF).sum(0)).sum())


def _a_step(G: _Group, monotone: bool = True):
    """Exact output-factor step: rows decouple, ``N = I (x) M^T Sigma M``.  ``monotone=False``
    takes the exact solution even if the sensitivity grows (used to restore feasibility)."""
    A = G.facs[0]
    M = khatri_rao(G.facs[1:])
    SM = G.SM if G.S is not None else M
    Gm = M.T @ SM
    Gm = 0.5 * (Gm + Gm.T)
    grad = G.WS @ M - A @ Gm
    d = _weights(G.facs, 0)
    X, _, _, _ = ellipsoid_least_norm(d, Gm, A, grad, G.e, G.target)
    dA = X - A
    lin, quad = float((grad * dA).sum()), float(((dA.T @ dA) * Gm).sum())
    t = _step_len(G.e, lin, quad, G.target, *_move(d, A, dA)) if monotone else 1.0
    if t > 0:
        G.apply(0, None, dA, lin, quad, t=t)


def _frob_step(G: _Group, k: int):
    """Input factor ``k`` with ``sigma=None``: rows decouple, ``N = I (x) (A^T A * prod F_l^T F_l)``."""
    n = 1 + k
    A, ins = G.facs[0], G.facs[1:]
    AtA = A.T @ A
    Gk = AtA.clone()
    for l in range(len(ins)):
        if l != k:
            Gk = Gk * (ins[l].T @ ins[l])
    grad = _contract_except(G.W.T @ A - khatri_rao(ins) @ AtA, ins, G.dims, k)
    d = _weights(G.facs, n)
    X, _, _, _ = ellipsoid_least_norm(d, Gk, ins[k], grad, G.e, G.target)
    dF = X - ins[k]
    lin, quad = float((grad * dF).sum()), float(((dF.T @ dF) * Gk).sum())
    t = _step_len(G.e, lin, quad, G.target, *_move(d, ins[k], dF))
    if t > 0:
        G.apply(n, None, dF, lin, quad, t=t)


def _block_exact(G: _Group, k: int, r0: int, r1: int, AtA, Mk, WSA, d):
    """Rows ``r0:r1`` of input factor ``k`` (Sigma metric), the other rows and factors fixed:
    one exact ``nb R x nb R`` subproblem, ``N[(i,r),(j,q)] = (A^T A)[r,q] (M_k^T Sigma_ij M_k)[r,q]``."""
    n = 1 + k
    idx = G.idx[k][r0:r1]
    nb, rest = idx.shape
    R = Mk.shape[1]
    cidx = idx.reshape(-1)
    Scols = G.cols(k, cidx, r0, r1)                                     # (D, nb rest)
    Sloc = Scols[cidx]                                                  # (nb rest, nb rest)
    grad = ((WSA[cidx] - G.SM[cidx] @ AtA).reshape(nb, rest, R) * Mk).sum(1)
    T1 = (Sloc.reshape(-1, rest) @ Mk).reshape(nb, rest, nb, R)
    Nm = torch.einsum("or,iojq->irjq", Mk, T1) * AtA[None, :, None, :]
    Nm = Nm.reshape(nb * R, nb * R)
    F0 = G.facs[n][r0:r1]
    X, _, _, _ = ellipsoid_least_norm(d.repeat(nb), Nm, F0.reshape(1, -1), grad.reshape(1, -1),
                                      G.e, G.target)
    dF = X.reshape(nb, R) - F0
    dM = (Mk[None] * dF[:, None, :]).reshape(nb * rest, R)
    dSM = Scols @ dM
    lin, quad = float((grad * dF).sum()), float((AtA * (dM.T @ dSM[cidx])).sum())
    t = _step_len(G.e, lin, quad, G.target, *_move(d, F0, dF))
    if t > 0:
        G.apply(n, slice(r0, r1), dF, lin, quad, dSM, t)


def _rows_majorized(G: _Group, k: int, AtA, Mk, WSA, d, chunk: int = 72):
    """Rows of input factor ``k`` one at a time (Gauss-Seidel), each against a majorised
    Hessian ``alpha_i K >= N_i`` with ``K = A^T A * (M_k^T Sbar M_k)`` shared by all rows, so one
    ``R x R`` eigendecomposition serves the whole factor.  A row's step is the exact least-norm
    point of the smaller (majorised) ellipsoid, hence feasible; the error is then updated with the
    exact ``N_i`` so unused slack carries over to the next rows.  ``Sigma M`` is updated per
    chunk of rows (``Sigma[:, chunk] dM``, one GEMM), within a chunk only on its own rows."""
    n = 1 + k
    Sbar, alpha = G.majorizer(k)
    idx = G.idx[k]
    nk, rest = idx.shape
    Dh = d.sqrt()
    K = AtA * (Mk.T @ Sbar @ Mk)
    lam, V = eigh(K / (Dh[:, None] * Dh[None, :]))
    lam = _null_cut(lam)
    alpha = alpha.tolist()
    # the per-row work is on (rest x R) and (R,) arrays: numpy, to keep the per-row overhead low
    npf = lambda x: x.detach().cpu().numpy()            # noqa: E731
    AtA_, Mk_, V_, lam_, Dh_, d_ = map(npf, (AtA, Mk, V, lam, Dh, d))
    VT_ = np.ascontiguousarray(V_.T)
    F = npf(G.facs[n]).copy()
    e, target, mu = G.e, G.target, None
    bs = max(1, min(nk, chunk // rest))
    for r0 in range(0, nk, bs):
        r1 = min(nk, r0 + bs)
        cidx = idx[r0:r1].reshape(-1)
        Scols = G.cols(k, cidx, r0, r1)
        Sloc = npf(Scols[cidx])
        SMloc = npf(G.SM[cidx]).copy()
        WSAloc = npf(WSA[cidx])
        dMc = np.zeros_like(SMloc)
        changed = False
        for j in range(r1 - r0):
            i = r0 + j
            sl = slice(j * rest, (j + 1) * rest)
            g = ((WSAloc[sl] - SMloc[sl] @ AtA_) * Mk_).sum(0)
            x0 = F[i]
            w0 = (x0 * Dh_) @ V_
            li = alpha[i] * lam_
            live = li > 0
            h = ((g / Dh_) @ V_) * live
            mu_i, _, _ = _secular(li, h * h, h * w0, w0 * w0, e, target, mu, rtol=1e-9)
            if mu_i == math.inf:
                w = np.where(live, w0 + h / np.where(live, li, 1.0), 0.0)
            else:
                b = 1.0 / (1.0 + mu_i * li)
                w = (1.0 - b) * w0 + (mu_i * b) * h
                if mu_i > 0:
                    mu = mu_i
            dx = (w @ VT_) / Dh_ - x0
            dM = Mk_ * dx
            dS = Sloc[:, sl] @ dM
            lin, quad = float(g @ dx), float(((dM @ AtA_) * dS[sl]).sum())
            t = _step_len(e, lin, quad, target, float((d_ * x0 * dx).sum()),
                          float((d_ * dx * dx).sum()))
            if t <= 0:
                continue
            F[i] = x0 + t * dx
            SMloc += t * dS
            dMc[sl] = t * dM
            e = e - 2.0 * t * lin + t * t * quad
            changed = True
        if changed:
            G.SM = G.SM + Scols @ torch.from_numpy(dMc).to(G.SM.device)
    G.e = e
    G.facs[n] = torch.from_numpy(F).to(G.facs[n].device)


def _input_step(G: _Group, k: int):
    if G.S is None:
        _frob_step(G, k)
        return
    n = 1 + k
    A = G.facs[0]
    ins = G.facs[1:]
    nk, R = ins[k].shape
    AtA = A.T @ A
    Mk = khatri_rao([ins[l] for l in range(len(ins)) if l != k])         # (rest, R)
    WSA = G.WS.T @ A                                                     # Sigma W^T A (D, R)
    d = _floor_d(_weights(G.facs, n))
    mode = G.rows
    if nk * R <= G.direct_max:
        _block_exact(G, k, 0, nk, AtA, Mk, WSA, d)
    elif mode == "block":
        bs = max(1, G.direct_max // R)
        for r0 in range(0, nk, bs):
            _block_exact(G, k, r0, min(nk, r0 + bs), AtA, Mk, WSA, d)
    elif mode == "exact" or (mode == "auto" and nk <= G.exact_rows):
        for r0 in range(nk):
            _block_exact(G, k, r0, r0 + 1, AtA, Mk, WSA, d)
    else:
        _rows_majorized(G, k, AtA, Mk, WSA, d)


def _balance_step(G: _Group):
    """The free rescaling of the rank-one terms (``W~`` and the error unchanged)."""
    sc = _balance_scales(G.facs)
    bal = [F * s for F, s in zip(G.facs, sc)]
    sb = _ss(bal)
    if sb <= G.ss:
        if G.S is not None:
            p = sc[1]
            for s in sc[2:]:
                p = p * s
            G.SM = G.SM * p
        G.facs, G.ss = bal, sb


def _sweep(G: _Group):
    """One sweep: each input factor followed by the (cheap, exact) output factor, then balance."""
    for k in range(len(G.dims)):
        _input_step(G, k)
        G.ss = _ss(G.facs)
        _a_step(G)
        G.ss = _ss(G.facs)
    _balance_step(G)


def _extrapolate(G: _Group, prev, beta: float) -> bool:
    """Move the input factors on along the last sweep's change (``F + beta (F - F_prev)``),
    re-solve ``A`` exactly for them, balance; keep the result only if it is feasible and its
    sensitivity is lower (one fresh ``Sigma M`` per try)."""
    cur = (list(G.facs), G.e, G.ss, G.SM)
    facs = [G.facs[0]] + [F + beta * (F - P) for F, P in zip(G.facs[1:], prev[1:])]
    G.facs = facs
    G.e, G.SM = G.fresh(facs)
    G.ss = _ss(facs)
    _a_step(G, monotone=False)
    G.ss = _ss(G.facs)
    _balance_step(G)
    if G.e <= G.limit and G.ss < cur[2] and math.isfinite(G.ss):
        return True
    G.facs, G.e, G.ss, G.SM = cur
    return False


def _sweep_flops(G: _Group, R: int) -> float:
    """Estimated flops of one sweep (with extrapolation): per input factor one ``Sigma dM``
    update (``2 D^2 R``) plus ``Sigma W^T A`` / ``W Sigma M`` (``4 T D R``), and one fresh
    ``Sigma M`` for the extrapolation; ``Sigma = I``: only the ``T D R`` products."""
    T, D = G.W.shape
    m = len(G.dims)
    if G.S is None:
        return 2.0 * R * 4.0 * T * D * (m + 1)
    return 2.0 * R * (D * D + 4.0 * T * D) * (m + 1)


def _stable_one(G: _Group, max_sweeps, tol, verify_every, extrapolate=True):
    """Run the sweeps on a started group (:meth:`_Group.start`)."""
    _balance_step(G)
    ss_hist, err_hist = [G.ss], [G.e]
    good = (list(G.facs), G.e, G.ss, G.SM, 0)
    converged = False
    it = 0
    beta = 1.0
    while it < max_sweeps:
        it += 1
        prev = list(G.facs)
        _sweep(G)
        if extrapolate and it > 1:
            if _extrapolate(G, prev, beta):
                beta = min(beta * 1.5, 8.0)
            else:
                beta = max(beta * 0.5, 0.25)
        if not (math.isfinite(G.ss) and math.isfinite(G.e)):
            raise NumericalError(f"{layer_label(G.name)}: stable CP diverged (non-finite at sweep {it})",
                                 hint="check the weight and sigma, or use a smaller rank")
        ss_hist.append(G.ss)
        err_hist.append(G.e)
        stop = ss_hist[-2] - G.ss <= tol * ss_hist[-2]
        if stop or it == max_sweeps or it % verify_every == 0:
            # explicit error from the residual (and a fresh Sigma M): the tracked error only
            # accumulates rounding, but the guarantee is checked, not assumed
            e, SM = G.fresh(G.facs)
            if not e <= G.limit:
                G.facs, G.e, G.ss, G.SM, it = good
                del ss_hist[it + 1:], err_hist[it + 1:]
                break
            G.e, G.SM = e, SM
            err_hist[-1] = e
            good = (list(G.facs), G.e, G.ss, G.SM, it)
        if stop:
            converged = True
            break
    return G.facs, G.e, ss_hist, err_hist, it, converged


def _split_init(init: CPResult, g: int, layout: str, name):
    if not isinstance(init, CPResult):
        raise InputError(f"{layer_label(name)}: init must be a CPResult, got {type(init).__name__}",
                         hint="pass the result of ddtd.solvers.cp_als, or init=None")
    if init.layout != layout:
        raise InputError(f"{layer_label(name)}: init has layout {init.layout!r}, expected {layout!r}",
                         hint="pass layout=init.layout")
    if init.groups != g:
        raise InputError(f"{layer_label(name)}: init has {init.groups} groups, the layer {g}",
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
              rows: str = "auto", exact_rows: int = 4, extrapolate: bool = True,
              max_gflop: float | None = 400.0, verify_every: int = 5,
              damping: float = default_damping("cp3-stable"), eps_rel: float = EPS_REL,
              cp_options: dict | None = None,
              groups: int | None = None, device=None, dtype: torch.dtype | None = None,
              finish: str = "channel", name: str | None = None) -> StableCPResult:
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
        direct_max: input factors with at most this many unknowns ``n_k R`` are solved jointly
            and exactly (one ``n_k R x n_k R`` eigendecomposition); larger ones row by row.
        rows: the row update of larger input factors: ``'auto'`` (``'exact'`` for modes with at
            most ``exact_rows`` rows, else ``'majorize'``), ``'majorize'``, ``'exact'`` or
            ``'block'`` (blocks of ``floor(direct_max / R)`` rows, the original scheme), see the
            module docstring.
        exact_rows: see ``rows``.
        extrapolate: try an extrapolation after each sweep (see the module docstring).
        max_gflop: cap the sweeps at ``max(3, max_gflop / (estimated GFLOP per sweep))`` (per
            group); ``None``: only ``max_sweeps``.  The default keeps a 512 -> 512 3x3 conv at
            ``R ~ 285`` to 7 sweeps (``R ~ 143``: 15; roughly 15-20 s on one core); layers up to
            256 channels are not affected (``max_sweeps`` first).
        verify_every: recompute the error from the explicit residual every this many sweeps.
        finish: what follows the sweeps (both can only lower the error, so the bound still
            holds; ``sensitivity_after`` includes it, the histories end before it):

            - ``"channel"`` (default): scale each output channel (row of ``A``) by its
              least-squares factor ``alpha_t = <W_t, W~_t>_Sigma / <W~_t, W~_t>_Sigma`` (see
              :func:`rescale_outputs`). Minimising ``ss`` shrinks the factors, and at a fixed
              error that shrinks the layer's output, which compounds over a network; the
              per-channel scale restores it (benchmarks/results/stable_cp.txt). Raises ``ss``
              by a few percent.
            - ``"refit"``: replace ``A`` by its unconstrained least-squares fit to the stable
              input factors, ``A = W Sigma M (M^T Sigma M)^+`` (the CP-ALS ``A`` step; see
              :func:`refit_outputs`), then :func:`balance`. The general form of the channel
              scale: it removes the shrinkage in every direction the input factors span, not
              only per channel. Lower layer error, ``ss`` 3-7% higher; measured over CP-ALS
              seeds on the VGG (README) it is no more accurate than ``"channel"`` (8x: 92.25%
              against 92.23%, 5 seeds) and loses more at 4-bit rounding, so it is an option.
            - ``"none"``: the CPD-EPC point itself (error ``delta``, smallest ``ss``).
        damping: the constraint and every reported error use ``Sigma + damping *
            mean(diag(Sigma)) * I``; default ``DAMPING = 1e-3`` (:func:`ddtd.solvers.default_damping`,
            the pipeline's rule; also passed to the CP-ALS start when ``init`` is ``None``).
            Give an ``init`` fitted with the same damping.
        eps_rel: see :func:`ddtd.solvers._common.prepare_sigma` (only affects the CP-ALS start).
        groups, device, name: as in :func:`cp_als`.  dtype: of the returned factors (the solver
            works in float64; float32 rounding of the factors may move the error by ~1e-7
            relative).

    Returns:
        :class:`StableCPResult` (``rel_error`` = ``history[-1]``, the error of the returned
        factors; ``info`` as in :class:`CPResult`).

    Raises:
        InputError: bad shapes / layout / rank / init, or ``delta`` below the start error.
        NumericalError: NaN / Inf in weight, sigma or init, or a non-finite iterate.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    if layout not in ("cp3", "cp4"):
        raise InputError(f"unknown CP layout {layout!r}", hint="use 'cp3' or 'cp4'")
    if weight.dim() != 4:
        raise InputError(f"{layer_label(name)}: stable CP needs a conv kernel (T, S, kh, kw), got "
                         f"{tuple(weight.shape)}", hint="use sigma_svd for Linear layers")
    if finish not in ("channel", "refit", "none"):
        raise InputError(f"{layer_label(name)}: unknown finish {finish!r}",
                         hint="use 'channel' (the default), 'refit' or 'none'")
    if rows not in ("auto", "majorize", "exact", "block"):
        raise InputError(f"{layer_label(name)}: unknown rows mode {rows!r}",
                         hint="use 'auto', 'majorize', 'exact' or 'block'")
    R = int(rank)
    if R < 1:
        raise InputError(f"{layer_label(name)}: CP rank must be >= 1, got {R}", hint="choose rank >= 1")
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
        raise InputError(f"{layer_label(name)}: init has rank {init.A.shape[-1]}, expected {R}",
                         hint="pass rank equal to the init's rank")
    T, S, kh, kw = gs.weights[0].shape
    D = S * kh * kw
    dims = (S, kh * kw) if layout == "cp3" else (S, kh, kw)
    groups_, errs0 = [], []
    for w, s, st in zip(gs.weights, gs.sigmas, starts):
        W = w.reshape(T, D).to(device=dev, dtype=F64)
        s_obj, _ = prepare_sigma(s, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
        f = [F.to(device=dev, dtype=F64) for F in st]
        shapes = [(T, R)] + [(n, R) for n in dims]
        if [tuple(F.shape) for F in f] != shapes:
            raise InputError(f"{layer_label(name)}: init factors have shapes "
                             f"{[tuple(F.shape) for F in f]}, expected {shapes}",
                             hint="fit the init on this weight with the same layout and rank")
        G = _Group(W, s_obj, dims, 0.0, direct_max, rows, exact_rows, name)
        G.start(f)                     # the start's error from the explicit residual
        groups_.append(G)
        errs0.append(G.e)
    e_tot = sum(errs0)
    if delta is None:
        d2s = list(errs0)
    else:
        d2 = float(delta) ** 2
        if not d2 >= e_tot * (1 - 1e-12):
            raise InputError(f"{layer_label(name)}: delta^2 = {d2:.6g} is below the error of the start "
                             f"({e_tot:.6g})", hint="pass a larger delta, or delta=None")
        if e_tot > 0:
            d2s = [d2 * e / e_tot for e in errs0]
        else:
            bases = [G.base for G in groups_]
            d2s = [d2 * b / (sum(bases) or 1.0) for b in bases]
    outs = []
    for G, d2 in zip(groups_, d2s):
        G.set_delta(max(d2, 0.0))
        sweeps = max_sweeps
        if max_gflop is not None:
            sweeps = min(max_sweeps, max(3, int(float(max_gflop) * 1e9 // _sweep_flops(G, R))))
        outs.append((G,) + _stable_one(G, sweeps, tol, max(1, int(verify_every)),
                                       bool(extrapolate)))
    bases = [o[0].base for o in outs]
    btot = sum(bases) or 1.0

    def comb(hs):
        n = max(len(h) for h in hs)
        return [sum(h[min(i, len(h) - 1)] for h in hs) for i in range(n)]

    if finish != "none":
        fn = rescale_outputs if finish == "channel" else refit_outputs
        outs = [(o[0], fn(o[0].WS, o[0].S, o[1])) + tuple(o[2:]) for o in outs]
    ss_hist = comb([o[3] for o in outs])
    fl = [[F.to(dt) for F in o[1]] for o in outs]
    final_err = sum(o[0].fresh([F.to(F64) for F in f])[0] for o, f in zip(outs, fl))
    err_hist = [x / btot for x in comb([o[4] for o in outs])] + [final_err / btot]
    nF = len(fl[0])
    stacked = [fl[0][i] if g == 1 else torch.stack([f[i] for f in fl]) for i in range(nF)]
    return with_info(StableCPResult(
        layout=layout, A=stacked[0], B=stacked[1], C=stacked[2],
        E=stacked[3] if layout == "cp4" else None, kernel_size=(kh, kw),
        rel_error=final_err / btot, history=err_hist, raw_history=list(err_hist),
        n_iter=max(o[5] for o in outs), converged=all(o[6] for o in outs),
        seconds=time.perf_counter() - t0, groups=g,
        sensitivity_history=ss_hist, sensitivity_before=ss_hist[0],
        sensitivity_after=sum(_ss([F.to(F64) for F in f]) for f in fl),
        delta=math.sqrt(sum(d2s)), init_rel_error=e_tot / btot),
        weight, damping if sigma is not None else 0.0)


def rescale_outputs(WS: torch.Tensor, S: torch.Tensor | None, facs: list) -> list:
    """Scale the rows of ``A = facs[0]`` by ``alpha_t = <W_t, W~_t>_S / <W~_t, W~_t>_S``.

    ``WS = W S`` ``(T, D)`` (``W`` itself when ``S`` is ``None``, the identity; the solver's
    groups keep it), ``S (D, D)``, ``W~ = A M^T`` with ``M`` the Khatri-Rao product of the input
    factors. Per output channel this is the least-squares scale of ``W~_t`` against ``W_t`` in
    the metric ``S``, so ``||W_t - alpha_t W~_t||_S`` is at most ``||W_t - W~_t||_S``
    (``alpha_t = 1`` is one candidate): the error can only decrease.
    Returns new factors (``A`` scaled, the others unchanged).
    """
    A = facs[0]
    M = khatri_rao(facs[1:])
    approx = A @ M.T
    s_approx = approx if S is None else A @ (S @ M).T
    num = (WS * approx).sum(1)
    den = (s_approx * approx).sum(1)
    alpha = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
    return [A * alpha[:, None]] + list(facs[1:])


def refit_outputs(WS: torch.Tensor, S: torch.Tensor | None, facs: list) -> list:
    """Replace ``A = facs[0]`` by the least-squares output factor for the other factors, balanced.

    ``WS = W S`` ``(T, D)`` and ``S (D, D)`` as in :func:`rescale_outputs`; ``M`` ``(D, R)`` the
    Khatri-Rao product of the input factors. ``A G = W S M`` with ``G = M^T S M`` (CP-ALS's
    ``A`` step, :func:`~ddtd.solvers._common.spd_solve`) minimises ``||W - A M^T||_S`` over all
    ``A``, so the error is at most that of the current ``A``. The factors are then rescaled per
    rank-one term (:func:`balance`: ``W~`` unchanged, ``ss`` minimal for it).
    Returns new factors (float64).
    """
    M = khatri_rao(facs[1:])
    A = spd_solve(M.T @ (M if S is None else S @ M), WS @ M, right=True)
    return _balance([A] + [F.to(F64) for F in facs[1:]])


def stable_cp3(weight, sigma, rank, **kw) -> StableCPResult:
    """:func:`stable_cp` with ``layout='cp3'``."""
    return stable_cp(weight, sigma, rank, layout="cp3", **kw)


def stable_cp4(weight, sigma, rank, **kw) -> StableCPResult:
    """:func:`stable_cp` with ``layout='cp4'``."""
    return stable_cp(weight, sigma, rank, layout="cp4", **kw)
