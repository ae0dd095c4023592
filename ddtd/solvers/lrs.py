"""Low-rank + sparse ("LRS") approximation of a layer weight in the Sigma metric (seed 004).

Model.  ``W`` is the ``(T, D)`` layer matrix (conv kernel ``(T, S, kh, kw)`` flattened in unfold
order), ``Sigma`` the ``(D, D)`` PSD input covariance (``None``: Frobenius, ``Sigma = I``).

* additive (seed eq. 9):  ``W~ = L + S``
* masking  (seed eq. 10): ``W~ = (1 - M) . L + M . S_m`` (``M`` the 0/1 support of the sparse
  part; on the mask the stored value replaces ``L``).

``L`` is low-rank: ``L = A B`` (``A (T, r)``, ``B (r, D)``, Sigma-SVD) or, for a ``k x k`` conv,
a Tucker2 kernel (``U``, ``core``, ``V``, :func:`ddtd.solvers.tucker2`).  ``S`` has ``nnz``
nonzeros at ``indices`` (``(nnz, 2)`` int64 ``(row t, col d)``).

Objective: ``err(W~) = trace((W - W~) Sigma (W - W~)^T)``; all reported errors are relative,
``err / trace(W Sigma W^T)``.

**Masking = additive, for the fit.**  For a fixed support ``M`` and free values, the two models
represent the same set of matrices: ``(1 - M).L + M.S_m = L + S`` with ``S = M.(S_m - L)``.  So
the optimal ``W~`` for a given support and rank is the same in both modes; the mode changes only
the initialisation the seed pairs with it and the convention of the stored values
(``S_m = S + L`` on the mask; :meth:`LRSResult.sparse_delta` always returns the additive ``S``,
which is what :class:`ddtd.layers.sparse.LowRankSparse` adds to the low-rank chain).

**Initialisations** (the seed's, with ``L`` fitted in the solver's metric):

* ``'residual'`` (eq. 12): ``L`` = best rank-``r`` of ``W``; ``S`` = the ``nnz`` largest-magnitude
  entries of ``W - L`` (values copied).
* ``'masked'`` (eq. 13-14): ``M`` = the ``nnz`` largest ``|W_ij|``; ``L`` = rank-``r`` fit to
  ``W`` with the masked entries left free (entries in ``M`` do not count).  In the Frobenius
  norm this is the EM iteration ``L <- lowrank((1-M).W + M.L)``; in the Sigma metric it is the
  alternation below with the support frozen (``init_iter`` rounds).  Frobenius:
  ``S = W - L`` on ``M`` (masking values ``S_m = W`` on the mask, exactly eq. 14); Sigma: the
  exact row-solve values on ``M``.
* ``'data'``: ``L`` = best rank-``r`` of ``W``, support from the input-energy score (below),
  values solved exactly.
* ``'auto'`` (default): the full fit from each of the three, best result kept.

**Data-driven fit** (``max_iter`` rounds, each a descent step, best iterate kept):

(a) ``L`` = the Sigma-optimal low-rank approximation of ``W - S`` (closed form for svd; Tucker2
    ALS warm-started from the previous ``V``);
(b) with ``R = W - L``, the values on the current support are re-solved exactly row by row
    (:func:`solve_rows`).  (a) and (b) are exact block minimisations, so the error never
    increases.  Once this fixed-support descent stalls (a round lowers the error by less than
    ``switch_tol``, relative), new supports are proposed: the ``nnz`` largest input-energy
    scores ``|R_ij| sqrt(Sigma_jj)`` (the error ``R_ij^2 Sigma_jj`` that entry alone removes) and
    the largest scores of a diagonally preconditioned gradient step from the current ``S``,
    ``Z = S + (R - S) Sigma diag(Sigma)^{-1}``, scored ``|Z_ij| sqrt(Sigma_jj)`` (it accounts
    for the correlations in Sigma); each is solved exactly and replaces the support only if it
    lowers the error.  Switching only when stalled matters: switching greedily every round
    trades a correct support for one that merely suits the not-yet-adapted ``L`` (measured: a
    planted low-rank + sparse matrix is then not recovered; with the rule it is, to 1e-31).

**Row solve.**  With ``L`` and the support fixed the objective separates over rows:
``sum_t (R_t - s_t) Sigma (R_t - s_t)^T``.  For row ``t`` with support ``J`` (``s_t`` zero
outside ``J``) the gradient w.r.t. ``s_J`` is ``-2 (Sigma (R_t - s_t)^T)_J``; setting it to zero:
``Sigma_JJ s_J = (Sigma R_t^T)_J``, i.e. ``s_J = Sigma_JJ^{-1} (Sigma R_t^T)_J``.  (Not ``R_tJ``:
the sparse entries also compensate the residual outside ``J`` through the correlations in
``Sigma``.)  ``Sigma_JJ`` is a principal submatrix of the floored ``Sigma`` (see
:func:`ddtd.solvers._common.prepare_sigma`), hence positive definite.  Frobenius: ``s_J = R_tJ``.

**Storage** (:data:`INDEX_UNITS`): one nonzero costs its value plus one ``int32`` flat index
``t * D + d``, i.e. 2 units of 4 bytes; the low-rank part costs its factor elements.  A budget
in "units" is thus bytes / 4 at float32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError

from ._common import (EPS_REL, F64, _where, check_finite, diverged, prepare_sigma,
                      resolve_device_dtype)
from .svd import sigma_svd

__all__ = ["LRSResult", "lowrank_sparse", "magnitude_prune", "sigma_prune", "solve_rows",
           "split_budget", "lowrank_params", "storage_units", "INDEX_UNITS", "VALUE_BYTES",
           "INDEX_BYTES"]

#: Storage units (4-byte words) of one sparse index: a flat ``int32`` index ``t * D + d``.
INDEX_UNITS = 1
VALUE_BYTES = 4
INDEX_BYTES = 4

MODES = ("additive", "masking")
INITS = ("residual", "masked", "data", "auto")
LOWRANKS = ("svd", "tucker2")


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LRSResult:
    """``W~ = L + S`` (additive) or ``(1 - M).L + M.S_m`` (masking).

    Attributes:
        shape: the weight's shape (``(T, D)`` or ``(T, S, kh, kw)``).
        lowrank: ``'svd'``, ``'tucker2'`` or ``'none'`` (pure sparse, rank 0).
        factors: svd ``(A (T, r), B (r, D))``; tucker2 ``(U (T, R1), core (R1, R2, kh, kw),
            V (S, R2))``; none ``()``.
        rank: svd ``(r,)``, tucker2 ``(R1, R2)``, none ``(0,)``.
        indices: ``(nnz, 2)`` int64, ``(row t, column d)`` of the ``T x D`` matrix, sorted
            row-major.
        values: ``(nnz,)`` in the convention of ``mode`` (additive: ``S``; masking: ``S_m``,
            the value that replaces ``L`` on the mask).
        mode: ``'additive'`` or ``'masking'``.
        rel_error: final relative squared Sigma error (recomputed from the explicit residual).
        init_error: relative error of the initialisation.
        history: best-so-far relative error, ``[init, after round 1, ...]`` (non-increasing).
        n_iter, converged, seconds: rounds run, relative decrease fell below ``tol``, wall time.
    """

    shape: tuple
    lowrank: str
    factors: tuple
    rank: tuple
    indices: torch.Tensor
    values: torch.Tensor
    mode: str
    rel_error: float
    init_error: float
    history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    seconds: float = 0.0

    @property
    def A(self) -> torch.Tensor:
        if self.lowrank != "svd":
            raise AttributeError("A exists for lowrank='svd' only")
        return self.factors[0]

    @property
    def B(self) -> torch.Tensor:
        if self.lowrank != "svd":
            raise AttributeError("B exists for lowrank='svd' only")
        return self.factors[1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def T(self) -> int:
        return int(self.shape[0])

    @property
    def D(self) -> int:
        return int(math.prod(self.shape[1:]))

    def lowrank_matrix(self) -> torch.Tensor:
        """``L`` as ``(T, D)``."""
        return _lowrank_matrix(self.lowrank, self.factors, self.T, self.D,
                               self.values.dtype, self.values.device)

    def sparse_delta(self) -> torch.Tensor:
        """Additive sparse values ``(nnz,)``: ``W~ = L + scatter(indices, sparse_delta)``."""
        if self.mode == "additive" or self.nnz == 0:
            return self.values
        L = self.lowrank_matrix()
        return self.values - L[self.indices[:, 0], self.indices[:, 1]]

    def sparse_matrix(self) -> torch.Tensor:
        """The additive sparse part as a dense ``(T, D)`` matrix."""
        S = torch.zeros(self.T, self.D, dtype=self.values.dtype, device=self.values.device)
        S[self.indices[:, 0], self.indices[:, 1]] = self.sparse_delta()
        return S

    def matrix(self) -> torch.Tensor:
        """``W~`` as ``(T, D)``."""
        return self.lowrank_matrix() + self.sparse_matrix()

    def kernel(self) -> torch.Tensor:
        """``W~`` shaped like the weight."""
        return self.matrix().reshape(self.shape)

    @property
    def lowrank_params(self) -> int:
        return sum(int(f.numel()) for f in self.factors)

    @property
    def storage_units(self) -> int:
        """``lowrank_params + nnz * (1 + INDEX_UNITS)`` (4-byte words)."""
        return self.lowrank_params + self.nnz * (1 + INDEX_UNITS)

    def nbytes(self, value_bytes: int = VALUE_BYTES, index_bytes: int = INDEX_BYTES) -> int:
        """Bytes to store: factors and values at ``value_bytes``, one flat index per nonzero."""
        return (self.lowrank_params + self.nnz) * value_bytes + self.nnz * index_bytes


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------

def lowrank_params(shape, lowrank: str, rank) -> int:
    """Elements of the low-rank factors for a weight of ``shape`` (``(T, D)`` / ``(T,S,kh,kw)``)."""
    T = int(shape[0])
    D = int(math.prod(shape[1:]))
    if lowrank == "none":
        return 0
    if lowrank == "svd":
        r = int(rank if isinstance(rank, int) else rank[0])
        return r * (T + D)
    if lowrank == "tucker2":
        _, S, kh, kw = shape
        R1, R2 = (rank, rank) if isinstance(rank, int) else rank
        return T * R1 + R1 * R2 * kh * kw + S * R2
    raise InputError(f"unknown lowrank format {lowrank!r}", hint=f"use one of {LOWRANKS}")


def storage_units(shape, lowrank: str, rank, nnz: int) -> int:
    """Storage of an LRS layer in 4-byte units: factors + ``nnz * (1 + INDEX_UNITS)``."""
    return lowrank_params(shape, lowrank, rank) + int(nnz) * (1 + INDEX_UNITS)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def _lowrank_matrix(kind, factors, T, D, dtype, device):
    if kind == "none" or not factors:
        return torch.zeros(T, D, dtype=dtype, device=device)
    if kind == "svd":
        A, B = factors
        return (A.to(F64) @ B.to(F64)).to(dtype)
    U, G, V = factors
    return torch.einsum("ta,abij,sb->tsij", U.to(F64), G.to(F64), V.to(F64)).reshape(T, D).to(dtype)


def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the ``k`` largest entries of ``score`` (ties broken by position)."""
    M = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        M[torch.topk(score.reshape(-1), k, sorted=False).indices] = True
    return M.reshape(score.shape)


def solve_rows(R: torch.Tensor, sigma: torch.Tensor | None, mask: torch.Tensor, *,
               chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """Exact sparse values on a fixed support, row by row, in the Sigma metric.

    For every row ``t`` with support ``J = {d : mask[t, d]}``:
    ``s_t = argmin_{s : s_d = 0 for d not in J} (R_t - s) Sigma (R_t - s)^T``, i.e.
    ``s_J = Sigma_JJ^{-1} (Sigma R_t^T)_J`` (module docstring).

    Args:
        R: ``(T, D)`` float64 residual to fit.
        sigma: ``(D, D)`` float64 positive definite (pass the floored Sigma), or ``None``
            (Frobenius: ``s_J = R_tJ``).
        mask: ``(T, D)`` bool support.
        chunk_bytes: memory cap of the batched ``(rows, m, m)`` submatrices, ``m`` = the largest
            row support.

    Returns:
        ``(T, D)`` float64 matrix ``S`` (zero outside ``mask``).
    """
    if sigma is None:
        return torch.where(mask, R, torch.zeros((), dtype=R.dtype, device=R.device))
    T, D = R.shape
    S = torch.zeros_like(R)
    counts = mask.sum(1)
    m = int(counts.max()) if T else 0
    if m == 0:
        return S
    G = R @ sigma                                              # (T, D): rows (Sigma R_t^T)^T
    # columns of each row's support first (distinct indices; the tail is unused padding)
    order = torch.argsort(mask.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
    valid = torch.arange(m, device=R.device)[None, :] < counts[:, None]
    per = max(1, chunk_bytes // (8 * m * m))
    md = float(torch.diagonal(sigma).mean())
    for i in range(0, T, per):
        idx, v = order[i:i + per], valid[i:i + per]
        sub = sigma[idx[:, :, None], idx[:, None, :]]
        vv = v[:, :, None] & v[:, None, :]
        sub = torch.where(vv, sub, torch.zeros((), dtype=F64)) + torch.diag_embed((~v).to(F64) * md)
        rhs = torch.where(v, G[i:i + per].gather(1, idx), torch.zeros((), dtype=F64))
        x = _batched_spd_solve(sub, rhs, md)
        x = torch.where(v, x, torch.zeros((), dtype=F64))
        S[i:i + per].scatter_(1, idx, x)
    return S


def _batched_spd_solve(A: torch.Tensor, b: torch.Tensor, md: float) -> torch.Tensor:
    """``A x = b`` for a batch of SPD ``A`` (Cholesky; rows that fail get a growing jitter)."""
    Lc, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(b[..., None], Lc)[..., 0]
    bad = (info != 0) | ~torch.isfinite(x).all(-1)
    jitter = 1e-12
    while bool(bad.any()):
        if jitter > 1e-2:
            x[bad] = torch.linalg.lstsq(A[bad], b[bad][..., None], driver="gelsd").solution[..., 0]
            break
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        Lb, ib = torch.linalg.cholesky_ex(A[bad] + jitter * md * eye)
        xb = torch.cholesky_solve(b[bad][..., None], Lb)[..., 0]
        ok = (ib == 0) & torch.isfinite(xb).all(-1)
        idx = bad.nonzero().squeeze(1)
        x[idx[ok]] = xb[ok]
        bad[idx[ok]] = False
        jitter *= 100
    return x


def _err(E: torch.Tensor, sigma: torch.Tensor | None) -> float:
    """``trace(E Sigma E^T)`` in float64."""
    if sigma is None:
        return float((E * E).sum())
    return float(((E @ sigma) * E).sum())


class _LowRank:
    """The (a) step: Sigma-optimal low-rank approximation of a ``(T, D)`` matrix."""

    def __init__(self, kind, rank, shape, sigma_obj, tucker_iter, name):
        self.kind, self.shape, self.sigma, self.name = kind, shape, sigma_obj, name
        self.tucker_iter = tucker_iter
        self.T = int(shape[0])
        self.D = int(math.prod(shape[1:]))
        self.V = None
        if kind == "svd":
            self.rank = (int(rank if isinstance(rank, int) else rank[0]),)
        elif kind == "tucker2":
            R1, R2 = (rank, rank) if isinstance(rank, int) else rank
            self.rank = (int(R1), int(R2))
        else:
            self.rank = (0,)

    def fit(self, X: torch.Tensor):
        """Return ``(L (T, D) float64, factors float64)``."""
        if self.kind == "none":
            return torch.zeros_like(X), ()
        if self.kind == "svd":
            res = sigma_svd(X, self.sigma, self.rank[0], dtype=F64, name=self.name)
            return res.A @ res.B, (res.A, res.B)
        from .tucker2 import tucker2
        init = self.V if self.V is not None else "whitened"
        res = tucker2(X.reshape(self.shape), self.sigma, self.rank, init=init, dtype=F64,
                      max_iter=self.tucker_iter, tol=1e-7, name=self.name)
        self.V = res.V
        return res.kernel().reshape(self.T, self.D), (res.U, res.core, res.V)


def _check_args(weight, sigma, rank, nnz, density, mode, init, lowrank, name):
    if mode not in MODES:
        raise InputError(f"{_where(name)}: unknown mode {mode!r}", hint=f"use one of {MODES}")
    if init not in INITS:
        raise InputError(f"{_where(name)}: unknown init {init!r}", hint=f"use one of {INITS}")
    if lowrank not in LOWRANKS:
        raise InputError(f"{_where(name)}: unknown lowrank format {lowrank!r}",
                         hint=f"use one of {LOWRANKS}")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(f"{_where(name)}: weight must be (T, D) or (T, S, kh, kw), got {shape}",
                         hint="pass the Linear weight or the conv kernel (groups=1)")
    if sigma is not None and sigma.dim() == 3:
        raise InputError(f"{_where(name)}: grouped layers (sigma {tuple(sigma.shape)}) are not "
                         "supported by the low-rank + sparse solver",
                         hint="compress grouped / depthwise convs with sigma_prune (pure "
                              "sparse, per group) or leave them dense")
    T = weight.shape[0]
    D = int(math.prod(weight.shape[1:]))
    if (nnz is None) == (density is None):
        raise InputError(f"{_where(name)}: pass exactly one of nnz and density",
                         hint="e.g. nnz=1000 or density=0.1 (fraction of the T*D entries)")
    if density is not None:
        if not 0.0 <= float(density) <= 1.0:
            raise InputError(f"{_where(name)}: density {density} is outside [0, 1]",
                             hint="density is the fraction of nonzero entries of the sparse part")
        nnz = int(round(float(density) * T * D))
    nnz = int(nnz)
    if not 0 <= nnz <= T * D:
        raise InputError(f"{_where(name)}: nnz {nnz} is outside [0, T*D = {T * D}]",
                         hint="choose fewer nonzeros")
    if T * D >= 2 ** 31:
        raise InputError(f"{_where(name)}: T*D = {T * D} does not fit an int32 flat index",
                         hint="this layer is too large for the sparse format; leave it dense")
    if lowrank == "tucker2" and weight.dim() != 4:
        raise InputError(f"{_where(name)}: lowrank='tucker2' needs a conv kernel (T, S, kh, kw)",
                         hint="use lowrank='svd' for Linear layers")
    if isinstance(rank, int) or lowrank == "svd":
        rr = [int(rank if isinstance(rank, int) else rank[0])]
    else:
        rr = [int(x) for x in rank]
    if min(rr) < 0:
        raise InputError(f"{_where(name)}: rank {rank} is negative", hint="use rank >= 0")
    if lowrank == "svd" and rr[0] > min(T, D):
        raise InputError(f"{_where(name)}: rank {rr[0]} exceeds min(T, D) = {min(T, D)}",
                         hint="choose a smaller rank")
    if lowrank == "tucker2" and min(rr) > 0:
        R1, R2 = (rr[0], rr[0]) if len(rr) == 1 else rr
        if R1 > T or R2 > weight.shape[1]:
            raise InputError(f"{_where(name)}: Tucker2 ranks ({R1}, {R2}) invalid for "
                             f"T={T}, S={weight.shape[1]}", hint="need R1 <= T and R2 <= S")
    kind = lowrank if max(rr) > 0 else "none"
    return nnz, kind, T, D


def _pack(S: torch.Tensor, mask: torch.Tensor):
    idx = mask.nonzero()                                       # row-major order
    return idx.to(torch.int64), S[idx[:, 0], idx[:, 1]]


# --------------------------------------------------------------------------------------------
# solver
# --------------------------------------------------------------------------------------------

def lowrank_sparse(weight: torch.Tensor, sigma: torch.Tensor | None, rank, nnz: int | None = None,
                   *, density: float | None = None, mode: str = "additive", init: str = "auto",
                   lowrank: str = "svd", max_iter: int = 20, tol: float = 1e-6,
                   init_iter: int = 10, tucker_iter: int = 10,
                   candidates: tuple = ("energy", "gradient"), switch_tol: float = 1e-2,
                   damping: float = 0.0, eps_rel: float = EPS_REL, device=None,
                   dtype: torch.dtype | None = None, name: str | None = None) -> LRSResult:
    """Fit ``W~ = L + S`` (or the masking form) to ``weight`` in the Sigma metric.

    Args:
        weight: ``(T, D)`` Linear weight or ``(T, S, kh, kw)`` conv kernel (groups = 1).
        sigma: ``(D, D)`` PSD input covariance or ``None`` (Frobenius).
        rank: svd ``r`` (int); tucker2 ``(R1, R2)`` or one int; ``0`` = no low-rank part.
        nnz: number of nonzeros of the sparse part (or give ``density`` = nnz / (T*D)).
        mode: ``'additive'`` (``L + S``) or ``'masking'`` (``(1-M).L + M.S_m``); same fit (module
            docstring), different stored values.
        init: ``'residual'`` (seed eq. 12), ``'masked'`` (seed eq. 13-14), ``'data'``, or
            ``'auto'``: the full fit from each of the three, the best kept (3x the time).  The
            fit is a block descent and can stall in a local minimum: on planted low-rank +
            spikes problems only the masked start recovers the exact decomposition, while on
            activation-weighted layers the data start usually ends lowest.
        lowrank: ``'svd'`` or ``'tucker2'`` (``k x k`` conv).
        max_iter: rounds of the data-driven fit; ``0`` returns the initialisation.
        tol: stop when a round lowers the error by less than ``tol`` (relative).
        init_iter: alternation rounds of the ``'masked'`` initialisation's low-rank fit.
        tucker_iter: Tucker2 ALS iterations per (a) step.
        candidates: new-support rules tried when the fixed-support descent stalls: any of
            ``'energy'``, ``'gradient'`` (module docstring); ``()`` keeps the initial support.
        switch_tol: a round that lowers the error by less than this (relative) counts as
            stalled and triggers the support proposals.
        damping: Sigma += damping * mean(diag) * I (changes the objective).
        eps_rel: floor for the row solves, see :func:`ddtd.solvers._common.prepare_sigma`.
        device, dtype: compute device; dtype of returned factors / values (float32 default;
            the fit runs in float64).
        name: layer name, for error messages.

    Returns:
        :class:`LRSResult`.
    """
    t0 = time.perf_counter()
    nnz, kind, T, D = _check_args(weight, sigma, rank, nnz, density, mode, init, lowrank, name)
    if init == "auto":
        kw = dict(mode=mode, lowrank=lowrank, max_iter=max_iter, tol=tol, init_iter=init_iter,
                  tucker_iter=tucker_iter, candidates=candidates, switch_tol=switch_tol,
                  damping=damping,
                  eps_rel=eps_rel, device=device, dtype=dtype, name=name)
        runs = [lowrank_sparse(weight, sigma, rank, nnz, init=i, **kw) for i in INITS[:3]]
        best = min(runs, key=lambda r: r.rel_error)
        return dataclasses.replace(best, seconds=time.perf_counter() - t0)
    dev, dt = resolve_device_dtype(weight, device, dtype)
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    base = _err(W, s_obj)
    if base <= 0:
        raise InputError(f"{_where(name)}: the weight carries no energy in the Sigma metric "
                         "(W Sigma W^T = 0)", hint="the layer's output is constant; leave it dense")
    dsq = (torch.ones(D, dtype=F64, device=dev) if s_obj is None
           else torch.diagonal(s_obj).clamp_min(0).sqrt())
    lr = _LowRank(kind, rank, tuple(weight.shape), s_obj, tucker_iter, name)

    # ---- initialisation
    if init == "residual":
        L, fac = lr.fit(W)
        R = W - L
        M = _topk_mask(R.abs(), nnz)
        S = torch.where(M, R, torch.zeros((), dtype=F64))
    elif init == "masked":
        M = _topk_mask(W.abs(), nnz)
        S = torch.zeros_like(W)
        for _ in range(max(1, init_iter)):
            L, fac = lr.fit(W - S)
            S = solve_rows(W - L, s_solve, M)
        if s_obj is None:
            S = torch.where(M, W - L, torch.zeros((), dtype=F64))
    else:
        L, fac = lr.fit(W)
        R = W - L
        M = _topk_mask(R.abs() * dsq, nnz)
        S = solve_rows(R, s_solve, M)
    err = _err(W - L - S, s_obj)
    if not math.isfinite(err):
        raise diverged(name, "lowrank_sparse", "non-finite initial error")
    init_rel = err / base
    best = (err, L, fac, S, M)
    hist = [init_rel]
    converged = False
    it = 0

    # ---- data-driven fit
    cur = err
    for it in range(1, max_iter + 1):
        L, fac = lr.fit(W - S)
        R = W - L
        S = solve_rows(R, s_solve, M)
        e_keep = _err(R - S, s_obj)
        # new supports only once the fixed-support descent stalls (see the module docstring)
        if cur - e_keep <= switch_tol * cur:
            cands = []
            if "energy" in candidates:
                cands.append(_topk_mask(R.abs() * dsq, nnz))
            if "gradient" in candidates and s_obj is not None:
                Z = S + ((R - S) @ s_obj) / (dsq * dsq).clamp_min(1e-300)
                cands.append(_topk_mask(Z.abs() * dsq, nnz))
            for Mc in cands:
                if torch.equal(Mc, M):
                    continue
                Sc = solve_rows(R, s_solve, Mc)
                ec = _err(R - Sc, s_obj)
                if ec < e_keep:
                    e_keep, S, M = ec, Sc, Mc
        if not math.isfinite(e_keep):
            raise diverged(name, "lowrank_sparse", f"non-finite error in round {it}")
        prev, cur = best[0], e_keep
        if e_keep < prev:
            best = (e_keep, L, fac, S, M)
        hist.append(best[0] / base)
        if prev - best[0] <= tol * max(prev, 1e-300):
            converged = True
            break
    err, L, fac, S, M = best
    idx, vals = _pack(S, M)
    if mode == "masking":
        vals = vals + L[idx[:, 0], idx[:, 1]]
    rel = _err(W - L - S, s_obj) / base
    factors = tuple(f.to(dt) for f in fac)
    return LRSResult(tuple(weight.shape), kind, factors, lr.rank, idx, vals.to(dt), mode,
                     rel, init_rel, hist, it, converged, time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# pruning baselines
# --------------------------------------------------------------------------------------------

def _prune(weight, sigma, nnz, density, score_fn, solve, name, dtype, device):
    nnz, _, T, D = _check_args(weight, sigma, 0, nnz, density, "additive", "data", "svd", name)
    dev, dt = resolve_device_dtype(weight, device, dtype)
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=0.0, eps_rel=EPS_REL, device=dev, name=name)
    base = _err(W, s_obj)
    dsq = (torch.ones(D, dtype=F64, device=dev) if s_obj is None
           else torch.diagonal(s_obj).clamp_min(0).sqrt())
    M = _topk_mask(score_fn(W, dsq), nnz)
    S = solve_rows(W, s_solve, M) if solve else torch.where(M, W, torch.zeros((), dtype=F64))
    rel = _err(W - S, s_obj) / base if base > 0 else 0.0
    idx, vals = _pack(S, M)
    return LRSResult(tuple(weight.shape), "none", (), (0,), idx, vals.to(dt), "additive",
                     rel, rel, [rel], 0, True, 0.0)


def magnitude_prune(weight: torch.Tensor, sigma: torch.Tensor | None, nnz: int | None = None, *,
                    density: float | None = None, dtype: torch.dtype | None = None, device=None,
                    name: str | None = None) -> LRSResult:
    """Baseline: keep the ``nnz`` largest ``|W_ij|`` unchanged, zero the rest (global magnitude
    pruning of the layer).  ``sigma`` is only used for the reported error.  Returns an
    :class:`LRSResult` with ``lowrank='none'``."""
    return _prune(weight, sigma, nnz, density, lambda W, d: W.abs(), False, name, dtype, device)


def sigma_prune(weight: torch.Tensor, sigma: torch.Tensor | None, nnz: int | None = None, *,
                density: float | None = None, dtype: torch.dtype | None = None, device=None,
                name: str | None = None) -> LRSResult:
    """Data-aware pruning baseline: support = the ``nnz`` largest ``|W_ij| sqrt(Sigma_jj)``, values
    re-solved exactly in the Sigma metric on that support (:func:`solve_rows` with ``R = W``), so
    the kept weights compensate the pruned ones through the input correlations.  (Equals
    ``lowrank_sparse(..., rank=0, init='data', max_iter=0)``.)"""
    return _prune(weight, sigma, nnz, density, lambda W, d: W.abs() * d, True, name, dtype, device)


# --------------------------------------------------------------------------------------------
# budget split
# --------------------------------------------------------------------------------------------

def split_budget(weight: torch.Tensor, sigma: torch.Tensor | None, budget: int, *,
                 lowrank: str = "svd", fractions=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0),
                 max_iter: int = 8, name: str | None = None, **kwargs):
    """Split a storage ``budget`` (4-byte units, see :data:`INDEX_UNITS`) between the rank and the
    nonzeros so that the Sigma error is smallest.

    For each fraction ``f`` the low-rank part gets the largest rank whose factors fit in
    ``f * budget`` (svd: ``r = floor(f B / (T + D))``; tucker2: ``R1 = R2 = R``, the largest with
    ``T R + R^2 kh kw + S R <= f B``) and the sparse part the rest:
    ``nnz = floor((B - lowrank_params) / (1 + INDEX_UNITS))``.  ``f = 0`` is pure sparse
    (Sigma-aware pruning), ``f = 1`` pure low rank.  Each split is fitted with
    :func:`lowrank_sparse` (``max_iter`` rounds, ``init='data'`` unless given in ``kwargs``,
    extra ``kwargs`` passed on); refit the chosen split with more rounds / ``init='auto'`` if
    wanted.

    Returns:
        ``(rank, nnz, result, table)``: the best split, its :class:`LRSResult`, and
        ``[(fraction, rank, nnz, rel_error), ...]`` for every split tried.
    """
    if weight.dim() not in (2, 4):
        raise InputError(f"{_where(name)}: weight must be (T, D) or (T, S, kh, kw)",
                         hint="pass the Linear weight or the conv kernel")
    shape = tuple(weight.shape)
    T = shape[0]
    D = int(math.prod(shape[1:]))
    budget = int(budget)
    if budget < 1 + INDEX_UNITS:
        raise InputError(f"{_where(name)}: budget {budget} is too small for even one nonzero",
                         hint="give a budget of at least 2 units")
    kwargs.setdefault("init", "data")
    table, best = [], None
    tried = set()
    for f in fractions:
        lb = f * budget
        if lowrank == "svd":
            r = min(int(lb // (T + D)), min(T, D))
            rk = r
        else:
            _, S, kh, kw = shape
            r = 0
            while r < min(T, S) and lowrank_params(shape, "tucker2", r + 1) <= lb:
                r += 1
            rk = (r, r)
        nnz = (budget - lowrank_params(shape, lowrank, rk if r > 0 else 0)) // (1 + INDEX_UNITS)
        nnz = max(0, min(int(nnz), T * D))
        if (r, nnz) in tried or (r == 0 and nnz == 0):
            continue
        tried.add((r, nnz))
        res = lowrank_sparse(weight, sigma, rk, nnz, lowrank=lowrank, max_iter=max_iter,
                             name=name, **kwargs)
        table.append((float(f), r, nnz, res.rel_error))
        if best is None or res.rel_error < best[2].rel_error:
            best = (rk, nnz, res)
    if best is None:
        raise InputError(f"{_where(name)}: no split of budget {budget} is feasible",
                         hint="increase the budget")
    return best[0], best[1], best[2], table
