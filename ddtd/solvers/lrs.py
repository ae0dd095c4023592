"""Low-rank + sparse ("LRS") approximation of a layer weight in the Sigma metric.

Reference: C. Hawkins, H. Yang, M. Li, L. Lai, V. Chandra, "Low-rank+sparse tensor compression for neural networks", arXiv:2111.01697, 2021 (below: "the paper").

Model.  ``W`` is the ``(T, D)`` layer matrix (conv kernel ``(T, S, kh, kw)`` flattened in unfold
order), ``Sigma`` the ``(D, D)`` PSD input covariance (``None``: Frobenius, ``Sigma = I``).

* additive (the paper, eq. 9):  ``W~ = L + S``
* masking  (the paper, eq. 10): ``W~ = (1 - M) . L + M . S_m`` (``M`` the 0/1 support of the sparse
  part; on the mask the stored value replaces ``L``).

``L`` is low-rank: ``L = A B`` (``A (T, r)``, ``B (r, D)``, Sigma-SVD); for a ``k x k`` conv,
a Tucker2 kernel (``U``, ``core``, ``V``, :func:`ddtd.solvers.tucker2`); for a Linear layer or
an ungrouped 1x1 conv, a TT-matrix (the paper, section 2.1 "TTM" and section 2.2 "Folding to
high-order tensors": ``W (T x D)`` folded into the order-``2d`` tensor of modes
``t_1..t_d, d_1..d_d``, cores ``G_k (r_{k-1}, t_k, d_k, r_k)``, fitted by TT-ALS-Sigma,
:func:`ddtd.solvers.tt_matrix`).  ``S`` has ``nnz`` nonzeros at ``indices`` (``(nnz, 2)`` int64
``(row t, col d)``).

Objective: ``err(W~) = trace((W - W~) Sigma (W - W~)^T)``; all reported errors are relative,
``err / trace(W Sigma W^T)``.

**Masking = additive, for the fit.**  For a fixed support ``M`` and free values, the two models
represent the same set of matrices: ``(1 - M).L + M.S_m = L + S`` with ``S = M.(S_m - L)``.  So
the optimal ``W~`` for a given support and rank is the same in both modes; the mode changes only
the initialisation the seed pairs with it and the convention of the stored values
(``S_m = S + L`` on the mask; :meth:`LRSResult.sparse_delta` always returns the additive ``S``,
which is what :class:`ddtd.layers.sparse.LowRankSparse` adds to the low-rank chain).

**Initialisations** (the paper's, with ``L`` fitted in the solver's metric):

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
    ALS warm-started from the previous ``V``; TT-ALS-Sigma warm-started from the previous cores,
    whose best iterate is never worse than its start);
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

**Cost.**  The row solves dominate (``sum_t |J_t|^3`` flops plus gathering the ``Sigma_JJ``).
Rows are batched by support size (each batch padded only to its own largest support); the
Cholesky factors of the current support are cached, so the rounds of a fixed-support descent
(and the ``'masked'`` initialisation) cost two triangular solves per row; proposal rules that
fail are retried after 1, 2, 4, 8 stalled rounds (each proposal needs a fresh factorisation);
the ``'masked'`` initialisation stops once its frozen-support descent stalls (``switch_tol``; the
fit then continues the same descent).  Each round needs one ``T x D x D`` product: the svd step
reuses ``W Sigma`` and ``X Sigma`` (``Go = (W - L) Sigma = W Sigma - A A^T X Sigma``) and the
error after an exact solve is ``sum(R Go) - sum(S Go)`` (``S Sigma S^T = S Go`` on the
support).  When factorising a support would cost more than ``cg_iter`` products with Sigma
(``row_solver='auto'``: the large layers), the values are instead improved by at most
``cg_iter`` steps of preconditioned conjugate gradients started from the current values (a
descent step, not exact; preconditioner: the cached factors on the shared part of the support,
``1 / Sigma_dd`` elsewhere).

**Grouped convs** (weight ``(T, S/g, kh, kw)``, Sigma ``(g, D_g, D_g)``, ``D_g = (S/g) kh kw``,
``T_g = T/g``).  ``W`` is the ``(T, D_g)`` matrix ``weight.reshape(T, D_g)``; row ``t`` belongs to
group ``k = t // T_g`` and is measured in that group's ``Sigma_k``:
``err = sum_t (W_t - W~_t) Sigma_k(t) (W_t - W~_t)^T``.  Sparse indices are ``(t, d)`` in this
``T x D_g`` matrix (flat index ``t * D_g + d`` = the position in the kernel tensor).

* ``S/g > 1``: the low-rank part is per group, ``L_k = A_k B_k`` (``A (g, T_g, r)``,
  ``B (g, r, D_g)``; a grouped chain) or a per-group Tucker2 (leading group dim on ``U``,
  ``core``, ``V``).  Each (a) step is ``g`` independent Sigma-SVDs / Tucker2 fits.
* depthwise (``S/g = 1``, ``D_g = kh kw``): a per-group rank is meaningless (each group has
  ``T_g`` rows of length ``kh kw``), so the low-rank part is taken *across* channels with shared
  basis filters: ``L = A B``, ``A (T, r)``, ``B (r, kh kw)``, fitted in the per-row metrics
  ``sum_t (x_t - a_t B) Sigma_k(t) (x_t - a_t B)^T`` by alternating exact solves (``basis_iter``
  rounds per (a) step, warm-started from the previous ``B``): rows of ``A``:
  ``a_t = x_t Sigma_k B^T (B Sigma_k B^T)^{-1}`` (``r x r``); ``B``: the normal equations
  ``sum_k (A_k^T A_k) B Sigma_k = A^T [x_t Sigma_k(t)]_t``, one ``r kh kw``-dim SPD system
  ``(sum_k P_k (x) Sigma_k) vec(B) = vec(A^T X Sigma)`` with ``P_k = A_k^T A_k``.  Both are
  exact block minimisations, so the error never increases; the first ``B`` is the Sigma-SVD in
  the mean metric ``mean_k Sigma_k`` (exact when the channels' Sigmas agree; Frobenius: the plain
  SVD, closed form).
* the sparse support is chosen jointly over the whole ``T x D_g`` matrix (one top-``nnz`` of the
  energy scores ``|R_td| sqrt(Sigma_k(t),dd)``: groups compete for nonzeros); values are solved
  exactly per row in the row's own ``Sigma_k`` (:func:`solve_rows` with a 3-D Sigma).

**Storage** (:data:`INDEX_UNITS`): one nonzero costs its value plus one ``int32`` flat index
``t * D + d``, i.e. 2 units of 4 bytes; the low-rank part costs its factor elements.  A budget
in "units" is thus bytes / 4 at float32.  Factor elements (:func:`lowrank_params`): svd
``r (T + D)``; grouped svd ``g r (T_g + D_g) = r (T + g D_g)``; depthwise shared basis
``r (T + kh kw)``; Tucker2 ``g (T_g R1 + R1 R2 kh kw + S_g R2)``; TT-matrix
``sum_k r_{k-1} t_k d_k r_k`` (:func:`ddtd.solvers.formats.tt_matrix_params`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, layer_label

from ._common import (IterativeResult, CANCEL, EPS_REL, F64, check_finite, default_damping, diverged, eigh,
                      fit_diagnostics, prepare_sigma, qr, resolve_device_dtype, rounded, spd_solve)
from .formats import DEFAULT_TT_CORES, tt_matrix_modes, tt_matrix_params, tt_matrix_ranks, tt_rank_for_budget
from .svd import sigma_svd

__all__ = ["LRSResult", "lowrank_sparse", "magnitude_prune", "sigma_prune", "solve_rows",
           "split_budget", "lowrank_params", "rank_for_units", "storage_units", "INDEX_UNITS", "VALUE_BYTES",
           "INDEX_BYTES"]

#: Storage units (4-byte words) of one sparse index: a flat ``int32`` index ``t * D + d``.
INDEX_UNITS = 1
VALUE_BYTES = 4
INDEX_BYTES = 4

MODES = ("additive", "masking")
INITS = ("residual", "masked", "data", "auto")
LOWRANKS = ("svd", "tucker2", "tt")


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LRSResult(IterativeResult):
    """``W~ = L + S`` (additive) or ``(1 - M).L + M.S_m`` (masking).

    Attributes:
        shape: the weight's shape (``(T, D)`` or ``(T, S, kh, kw)``).
        lowrank: ``'svd'``, ``'tucker2'``, ``'tt'`` or ``'none'`` (pure sparse, rank 0).
        factors: svd ``(A (T, r), B (r, D))``; tucker2 ``(U (T, R1), core (R1, R2, kh, kw),
            V (S, R2))``; tt the TT-matrix cores ``(G_1, ..., G_d)``, ``G_k (r_{k-1}, t_k, d_k,
            r_k)`` (modes read from their shapes); none ``()``.  Grouped (``S/g > 1``): each factor with a leading group
            dim ``g`` (``A (g, T_g, r)``, ``B (g, r, D_g)``, ...).  Depthwise (``S/g = 1``,
            ``g > 1``): the shared basis ``A (T, r)``, ``B (r, kh*kw)`` (2-D, see the module
            docstring).
        rank: svd ``(r,)``, tucker2 ``(R1, R2)``, tt the bond ranks ``(r_1, ..., r_{d-1})``,
            none ``(0,)``.
        indices: ``(nnz, 2)`` int64, ``(row t, column d)`` of the ``T x D`` matrix (grouped:
            ``T x D_g``), sorted row-major.
        values: ``(nnz,)`` in the convention of ``mode`` (additive: ``S``; masking: ``S_m``,
            the value that replaces ``L`` on the mask).
        mode: ``'additive'`` or ``'masking'``.
        rel_error: relative squared Sigma error (Sigma damped as asked) of ``W~`` as returned:
            factors and values in ``dtype`` = ``history[-1]``.
        init_error: relative error of the initialisation.
        history: best-so-far relative error, ``[init, after round 1, ...]`` (non-increasing);
            every entry is the exact (float64) error of an iterate whose factors and values are
            rounded to ``dtype``; the returned one is the iterate of the last entry.
        n_iter, converged, seconds: rounds run, relative decrease fell below ``tol``, wall time.
        groups: the conv's groups (1 for an ordinary layer).
        info: ``damping``, ``norm_ratio``, ``identity_error`` (:func:`ddtd.solvers.fit_diagnostics`).
    """

    shape: tuple
    lowrank: str
    factors: tuple
    rank: tuple
    indices: torch.Tensor
    values: torch.Tensor
    mode: str
    init_error: float

    @property
    def shared(self) -> bool:
        """True for a depthwise conv's shared-basis low-rank part (``S/g = 1``, ``g > 1``)."""
        return _is_shared(self.shape, self.groups)

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
        """Columns of the matrix ``W``: ``D`` (grouped: ``D_g``, the per-group input length)."""
        return int(math.prod(self.shape[1:]))

    def lowrank_matrix(self) -> torch.Tensor:
        """``L`` as ``(T, D)`` (grouped: ``(T, D_g)``, group blocks stacked)."""
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

def _is_shared(shape, groups) -> bool:
    """Depthwise conv (one input channel per group, ``g > 1``): the shared-basis low rank."""
    return int(groups) > 1 and len(shape) == 4 and int(shape[1]) == 1


def lowrank_params(shape, lowrank: str, rank, groups: int = 1, *, tt_modes=None) -> int:
    """Elements of the low-rank factors for a weight of ``shape`` (``(T, D)`` / ``(T,S/g,kh,kw)``).

    svd ``r (T + D)``; grouped svd (``S/g > 1``) ``g r (T_g + D_g)``; depthwise (``S/g = 1``,
    ``g > 1``) shared basis ``r (T + kh kw)``; tucker2 ``g (T_g R1 + R1 R2 kh kw + S_g R2)``;
    tt ``sum_k r_{k-1} t_k d_k r_k`` for the modes ``tt_modes`` (``(out_modes, in_modes)``;
    default :func:`ddtd.solvers.formats.tt_matrix_modes` with one core more than bond ranks, or
    :data:`ddtd.solvers.formats.DEFAULT_TT_CORES` for an int rank), ranks clipped as the solver
    clips them.
    """
    g = int(groups)
    T = int(shape[0])
    D = int(math.prod(shape[1:]))
    if g < 1 or T % g:
        raise InputError(f"groups={groups} does not divide the {T} output channels",
                         hint="pass the conv's groups value")
    if lowrank == "none":
        return 0
    if lowrank == "svd":
        r = int(rank if isinstance(rank, int) else rank[0])
        if g == 1 or _is_shared(shape, g):
            return r * (T + D)
        return g * r * (T // g + D)
    if lowrank == "tucker2":
        _, S, kh, kw = shape
        R1, R2 = (rank, rank) if isinstance(rank, int) else rank
        return g * ((T // g) * R1 + R1 * R2 * kh * kw + S * R2)
    if lowrank == "tt":
        if (rank if isinstance(rank, int) else max(rank, default=0)) == 0:
            return 0
        om, im = _tt_modes(T, D, rank, tt_modes)
        return tt_matrix_params(om, im, tt_matrix_ranks(rank, om, im))
    raise InputError(f"unknown lowrank format {lowrank!r}", hint=f"use one of {LOWRANKS}")


def storage_units(shape, lowrank: str, rank, nnz: int, groups: int = 1, *, tt_modes=None) -> int:
    """Storage of an LRS layer in 4-byte units: factors + ``nnz * (1 + INDEX_UNITS)``
    (``shape`` is the weight's, ``(T, S/g, kh, kw)`` for a grouped conv)."""
    return lowrank_params(shape, lowrank, rank, groups, tt_modes=tt_modes) + int(nnz) * (1 + INDEX_UNITS)


def rank_for_units(shape, lowrank: str, units: float, groups: int = 1, *, tt_modes=None):
    """The largest rank of the ``lowrank`` format whose factors fit ``units`` (see
    :func:`lowrank_params`): svd ``r`` (at most ``min(T, D)``, per group ``min(T_g, D_g)``),
    tucker2 ``(R, R)`` (at most ``min(T_g, S_g)``), tt the largest uniform bond rank, clipped per
    bond (:func:`ddtd.solvers.formats.tt_rank_for_budget`); ``0`` when none fits."""
    g = int(groups)
    T, D = int(shape[0]), int(math.prod(shape[1:]))
    if lowrank == "svd":
        rmax = min(T, D) if (g == 1 or _is_shared(shape, g)) else min(T // g, D)
        return max(0, min(int(units // lowrank_params(shape, "svd", 1, g)), rmax))
    if lowrank == "tt":
        modes = _tt_modes(T, D, 1, tt_modes)
        rk = tt_rank_for_budget(T, D, 1, 1, units, modes=modes)
        return rk if lowrank_params(shape, "tt", rk, tt_modes=modes) <= units else 0
    r = 0
    while r < min(T // g, shape[1]) and lowrank_params(shape, "tucker2", r + 1, g) <= units:
        r += 1
    return (r, r) if r else 0


def _tt_modes(T: int, D: int, rank, tt_modes):
    """``(out_modes, in_modes)`` of the TT-matrix low-rank part (see :func:`lowrank_params`)."""
    if tt_modes is not None:
        return tt_matrix_modes(T, D, out_modes=tt_modes[0], in_modes=tt_modes[1])
    return tt_matrix_modes(T, D, len(rank) + 1 if isinstance(rank, (tuple, list)) else DEFAULT_TT_CORES)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def _lowrank_matrix(kind, factors, T, D, dtype, device):
    if kind == "none" or not factors:
        return torch.zeros(T, D, dtype=dtype, device=device)
    if kind == "svd":
        A, B = factors
        return (A.to(F64) @ B.to(F64)).reshape(T, D).to(dtype)
    if kind == "tt":
        from .tt import tt_full

        return tt_full([G.to(F64) for G in factors]).to(dtype)
    U, G, V = factors
    if U.dim() == 3:
        K = torch.einsum("gta,gabij,gsb->gtsij", U.to(F64), G.to(F64), V.to(F64))
    else:
        K = torch.einsum("ta,abij,sb->tsij", U.to(F64), G.to(F64), V.to(F64))
    return K.reshape(T, D).to(dtype)


def _sig_mul(E: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """Every row of ``E (T, D)`` times its Sigma: ``E Sigma`` for a ``(D, D)`` Sigma; for a
    ``(g, D, D)`` stack row ``t`` uses ``Sigma[t // (T/g)]``; ``None``: ``E``."""
    if sigma is None:
        return E
    if sigma.dim() == 2:
        return E @ sigma
    g = sigma.shape[0]
    return torch.bmm(E.reshape(g, -1, E.shape[1]), sigma).reshape(E.shape)


def _row_dsq(sigma: torch.Tensor | None, T: int, D: int, device) -> torch.Tensor:
    """``sqrt(Sigma_dd)`` per column (``(D,)``) or per row and column (``(T, D)``, grouped)."""
    if sigma is None:
        return torch.ones(D, dtype=F64, device=device)
    d = torch.diagonal(sigma, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    if sigma.dim() == 3:
        d = d.repeat_interleave(T // sigma.shape[0], dim=0)
    return d


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
    ``s_t = argmin_{s : s_d = 0 for d not in J} (R_t - s) Sigma_t (R_t - s)^T``, i.e.
    ``s_J = Sigma_t,JJ^{-1} (Sigma_t R_t^T)_J`` (module docstring), where ``Sigma_t = Sigma`` for a
    ``(D, D)`` Sigma and ``Sigma_t = Sigma[t // (T/g)]`` for a grouped ``(g, D, D)`` stack.

    Rows are batched by support size (sorted, each batch padded only to its own largest
    support), one batched Cholesky per batch.

    Args:
        R: ``(T, D)`` float64 residual to fit.
        sigma: ``(D, D)`` or ``(g, D, D)`` float64 positive definite (pass the floored Sigma),
            or ``None`` (Frobenius: ``s_J = R_tJ``).
        mask: ``(T, D)`` bool support.
        chunk_bytes: memory cap of the batched ``(rows, m, m)`` submatrices, ``m`` = the largest
            row support of the batch.

    Returns:
        ``(T, D)`` float64 matrix ``S`` (zero outside ``mask``).
    """
    if sigma is None:
        return torch.where(mask, R, torch.zeros((), dtype=R.dtype, device=R.device))
    return _solve_rows(R, sigma, mask, _sig_mul(R, sigma), chunk_bytes=chunk_bytes)


def _support_layout(mask: torch.Tensor):
    """``(counts (T,), idx (T, m))``: each row's support columns first (ascending), then padding
    (column 0); ``m`` = the largest support.  O(nnz)."""
    T = mask.shape[0]
    counts = mask.sum(1)
    m = int(counts.max()) if T else 0
    nz = mask.nonzero()
    idx = torch.zeros(T, max(m, 1), dtype=torch.int64, device=mask.device)
    if nz.shape[0]:
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(nz.shape[0], device=mask.device) - start[nz[:, 0]]
        idx[nz[:, 0], pos] = nz[:, 1]
    return counts, idx[:, :m]


def _solve_rows(R: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, G: torch.Tensor, *,
                chunk_bytes: int = 1 << 26, factors=None) -> torch.Tensor:
    """:func:`solve_rows` with ``G = _sig_mul(R, sigma)`` given (the right-hand sides);
    ``factors`` = :func:`_factor_rows` of ``(sigma, mask)`` to skip the factorisations."""
    if factors is None:
        factors = _factor_rows(sigma, mask, chunk_bytes=chunk_bytes)
    S = torch.zeros_like(R)
    for rows, idx, v, Lc, A in factors:
        n, m = idx.shape
        rhs = torch.where(v, G[rows[:, None], idx], torch.zeros((), dtype=F64, device=R.device))
        if Lc is not None:
            x = _chol_solve(Lc, rhs[..., None])[..., 0]
        else:                                   # not cached: the robust solve
            x = _batched_spd_solve(A[0], rhs, A[1])
        S[rows[:, None].expand(n, m)[v], idx[v]] = x[v]
    return S


def _factor_rows(sigma: torch.Tensor, mask: torch.Tensor, *, chunk_bytes: int = 1 << 26):
    """Cholesky factors of every row's ``Sigma_t,JJ``, batched by support size: a list of
    ``(rows, idx, valid, Lc, A)``; a batch whose Cholesky fails even with jitter keeps
    ``Lc = None`` and ``A = (submatrices, scale)`` for :func:`_batched_spd_solve`."""
    T = mask.shape[0]
    dev = mask.device
    counts, idx_all = _support_layout(mask)
    out = []
    if idx_all.shape[1] == 0:
        return out
    grouped = sigma.dim() == 3
    diag_mean = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)
    if grouped:
        grp = torch.arange(T, device=dev) // (T // sigma.shape[0])
        md_row = diag_mean[grp]
    else:
        md_row = diag_mean.expand(T)
    md_row = torch.where(md_row > 0, md_row, torch.ones((), dtype=F64, device=dev))
    cnt_sorted, rows_sorted = torch.sort(counts, descending=True, stable=True)
    cnt_list = cnt_sorted.tolist()
    i = 0
    while i < T and cnt_list[i] > 0:
        m = cnt_list[i]
        per = max(1, chunk_bytes // (8 * m * m))
        rows = rows_sorted[i:i + per]
        rows = rows[cnt_sorted[i:i + per] > 0]
        n = rows.shape[0]
        idx = idx_all[rows, :m]
        v = torch.arange(m, device=dev)[None, :] < counts[rows, None]
        sub = _gather_sub(sigma, idx, grp[rows] if grouped else None)
        cn = counts[rows].tolist()
        if cn[-1] < m:                           # padding (sorted: the tail rows of the batch)
            for k in range(n - 1, -1, -1):
                c = cn[k]
                if c == m:
                    break
                sub[k, c:, :] = 0.0                 # identity * md on the padded block
                sub[k, :, c:] = 0.0
                sub[k, c:, c:].diagonal().fill_(float(md_row[rows[k]]))
        md = md_row[rows]
        Lc = _batched_cholesky(sub, md)
        out.append((rows, idx, v, Lc, None if Lc is not None else (sub, md)))
        i += n
    return out


def _gather_sub(sigma: torch.Tensor, idx: torch.Tensor, grp) -> torch.Tensor:
    """``sigma[(grp,) idx[:, :, None], idx[:, None, :]]`` as ``(n, m, m)``: one ``index_select``
    of flat (int32 when they fit) indices, ~2x faster than advanced indexing on CPU."""
    D = sigma.shape[-1]
    it = torch.int32 if sigma.numel() < 2 ** 31 else torch.int64
    i = idx.to(it)
    flat = (i * D)[:, :, None] + i[:, None, :]
    if grp is not None:
        flat = flat + (grp.to(it) * (D * D))[:, None, None]
    n, m = idx.shape
    return sigma.reshape(-1).index_select(0, flat.reshape(-1)).reshape(n, m, m)


def _factor_bytes(mask: torch.Tensor) -> int:
    """Upper bound of the memory of :func:`_factor_rows` (float64)."""
    c = mask.sum(1).to(torch.float64)
    return int(8 * float((c * c).sum()) * 1.25) + 1


def _batched_cholesky(A: torch.Tensor, md: torch.Tensor):
    """Lower Cholesky factors of a batch of SPD ``A (n, m, m)``; failing systems get a growing
    jitter relative to ``md (n,)`` (up to ``1e-2``); ``None`` if some still fail."""
    Lc, info = torch.linalg.cholesky_ex(A)
    bad = (info != 0) | ~torch.isfinite(Lc.diagonal(dim1=-2, dim2=-1)).all(-1)
    jitter = 1e-12
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    while bool(bad.any()):
        if jitter > 1e-2:
            return None
        idx = bad.nonzero().squeeze(1)
        Lb, ib = torch.linalg.cholesky_ex(A[idx] + jitter * md[idx][:, None, None] * eye)
        ok = (ib == 0) & torch.isfinite(Lb.diagonal(dim1=-2, dim2=-1)).all(-1)
        Lc[idx[ok]] = Lb[ok]
        bad[idx[ok]] = False
        jitter *= 100
    return Lc


def _chol_solve(Lc: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(Lc Lc^T)^{-1} b`` by two triangular solves (much faster than batched
    ``cholesky_solve`` on CPU)."""
    y = torch.linalg.solve_triangular(Lc, b, upper=False)
    return torch.linalg.solve_triangular(Lc.mT, y, upper=True)


def _batched_spd_solve(A: torch.Tensor, b: torch.Tensor, md) -> torch.Tensor:
    """``A x = b`` for a batch of SPD ``A (n, m, m)``, ``b (n, m)`` or ``(n, m, c)`` (Cholesky;
    systems that fail get a growing jitter relative to ``md`` (a float or ``(n,)`` scale), then
    least squares)."""
    vec = b.dim() == A.dim() - 1
    bb = b[..., None] if vec else b
    md = torch.as_tensor(md, dtype=A.dtype, device=A.device).expand(A.shape[0])
    Lc, info = torch.linalg.cholesky_ex(A)
    x = _chol_solve(Lc, bb)
    bad = (info != 0) | ~torch.isfinite(x).flatten(1).all(-1)
    jitter = 1e-12
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    while bool(bad.any()):
        if jitter > 1e-2:
            # gelsd (rank-revealing) exists on the CPU only; CUDA's gels assumes full rank
            x[bad] = torch.linalg.lstsq(A[bad].cpu(), bb[bad].cpu(), driver="gelsd").solution.to(x.device)
            break
        Lb, ib = torch.linalg.cholesky_ex(A[bad] + jitter * md[bad][:, None, None] * eye)
        xb = torch.cholesky_solve(bb[bad], Lb)
        ok = (ib == 0) & torch.isfinite(xb).flatten(1).all(-1)
        idx = bad.nonzero().squeeze(1)
        x[idx[ok]] = xb[ok]
        bad[idx[ok]] = False
        jitter *= 100
    return x[..., 0] if vec else x


def _sparse_sig_mul(S: torch.Tensor, M: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``S Sigma`` as :func:`_sig_mul` for ``S`` zero outside the mask ``M``: a sparse product
    (``nnz D``) for one ``(D, D)`` Sigma, dense per group otherwise."""
    if sigma.dim() != 2:
        return _sig_mul(S, sigma)
    idx = M.nonzero()
    if idx.shape[0] == 0:
        return torch.zeros_like(S)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):   # nonzero(): sorted, unique
        sp = torch.sparse_coo_tensor(idx.T, S[idx[:, 0], idx[:, 1]], S.shape,
                                     check_invariants=False, is_coalesced=True)
        return torch.sparse.mm(sp, sigma)


def _err(E: torch.Tensor, sigma: torch.Tensor | None) -> float:
    """``sum_t E_t Sigma_t E_t^T`` in float64 (``trace(E Sigma E^T)`` for one Sigma)."""
    if sigma is None:
        return float((E * E).sum())
    return float((_sig_mul(E, sigma) * E).sum())


class _LowRank:
    """The (a) step: Sigma-optimal low-rank approximation of a ``(T, D)`` matrix (per group for a
    grouped conv; the shared basis for a depthwise conv; a TT-matrix, module docstring)."""

    def __init__(self, kind, rank, shape, groups, sigma_obj, sigma_solve, tucker_iter,
                 basis_iter, name, tt_modes=None):
        self.kind, self.shape, self.sigma, self.name = kind, shape, sigma_obj, name
        self.sigma_solve = sigma_solve
        self.tucker_iter, self.basis_iter = tucker_iter, max(1, int(basis_iter))
        self.g = int(groups)
        self.shared = _is_shared(shape, groups)
        self.T = int(shape[0])
        self.D = int(math.prod(shape[1:]))
        self.V = None
        self.B = None
        self.cores = None
        if kind == "tt":
            self.modes = _tt_modes(self.T, self.D, rank, tt_modes)
            self.rank = tt_matrix_ranks(rank, *self.modes)
        elif kind == "svd":
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
            if self.shared:
                return self._fit_shared(X)
            res = sigma_svd(X, self.sigma, self.rank[0], groups=self.g, damping=0.0, dtype=F64,
                            name=self.name)
            return (res.A @ res.B).reshape(self.T, self.D), (res.A, res.B)
        if self.kind == "tt":
            return self._fit_tt(X)
        from .tucker2 import tucker2
        if self.g == 1:
            init = self.V if self.V is not None else "whitened"
            res = tucker2(X.reshape(self.shape), self.sigma, self.rank, init=init, dtype=F64,
                          damping=0.0, max_iter=self.tucker_iter, tol=1e-7, name=self.name)
            self.V = res.V
            return res.kernel().reshape(self.T, self.D), (res.U, res.core, res.V)
        Tg = self.T // self.g
        outs = []
        for k in range(self.g):
            init = self.V[k] if self.V is not None else "whitened"
            sk = None if self.sigma is None else self.sigma[k]
            outs.append(tucker2(X[k * Tg:(k + 1) * Tg].reshape(Tg, *self.shape[1:]), sk,
                                self.rank, init=init, dtype=F64, damping=0.0,
                                max_iter=self.tucker_iter, tol=1e-7, name=self.name))
        U, G, V = (torch.stack([getattr(o, a) for o in outs]) for a in ("U", "core", "V"))
        self.V = V
        L = torch.einsum("gta,gabij,gsb->gtsij", U, G, V).reshape(self.T, self.D)
        return L, (U, G, V)

    def _fit_tt(self, X: torch.Tensor):
        """TT-ALS-Sigma of ``X`` (``tucker_iter`` iterations), warm-started from the previous
        cores: its best iterate is never worse than they are, so the (a) step descends."""
        from .tt import tt_matrix

        init = self.cores if self.cores is not None else "whitened"
        res = tt_matrix(X, self.sigma, self.rank, out_modes=self.modes[0], in_modes=self.modes[1],
                        init=init, max_iter=max(2, self.tucker_iter), tol=1e-7, damping=0.0,
                        dtype=F64, name=self.name)
        self.cores = list(res.cores)
        return res.matrix(), tuple(res.cores)

    def _fit_shared(self, X: torch.Tensor):
        """Depthwise: ``min_{A, B} sum_t (x_t - a_t B) Sigma_t (x_t - a_t B)^T`` by alternating
        exact solves, warm-started from the previous ``B`` (module docstring)."""
        r, T, D, g = self.rank[0], self.T, self.D, self.g
        s = self.sigma_solve
        if s is None:                                # one metric (I): the plain SVD, closed form
            res = sigma_svd(X, None, r, damping=0.0, dtype=F64, name=self.name)
            return res.A @ res.B, (res.A, res.B)
        SX = _sig_mul(X, s)                                        # (T, D) rows x_t Sigma_t
        B = self.B
        if B is None:                              # exact when every channel has the same Sigma
            B = sigma_svd(X, s.mean(0), r, damping=0.0, dtype=F64, name=self.name).B
            B = qr(B.T)[0].T
        Tg = T // g
        md = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)          # (g,)
        for _ in range(self.basis_iter):
            # rows of A: a_t (B Sigma_k B^T) = x_t Sigma_k B^T, one r x r system per group
            Gk = B @ s @ B.T                                        # (g, r, r)
            rhs = (SX @ B.T).reshape(g, Tg, r)
            A = _batched_spd_solve(Gk, rhs.transpose(1, 2), md).transpose(1, 2).reshape(T, r)
            # B: (sum_k P_k (x) Sigma_k) vec(B) = vec(A^T X Sigma), P_k = A_k^T A_k
            Ak = A.reshape(g, Tg, r)
            P = Ak.transpose(1, 2) @ Ak                             # (g, r, r)
            M = torch.einsum("kij,kde->idje", P, s).reshape(r * D, r * D)
            B = spd_solve(M, (A.T @ SX).reshape(r * D, 1)).reshape(r, D)
            # gauge: orthonormal basis rows (A B unchanged)
            Q, Rq = qr(B.T)
            A, B = A @ Rq.T, Q.T
        self.B = B
        return A @ B, (A, B)


#: memory cap of the cached row factorisations of the current support (bytes)
CACHE_BYTES = 1 << 30
ROW_SOLVERS = ("auto", "exact", "cg")


class _Steps:
    """The two block steps of the fit with shared products (one ``T x D x D`` product per round
    instead of one per step / error evaluation) and cached row factorisations.

    ``lowrank(X)`` returns ``(L, factors, Go)`` with ``Go = (W - L) Sigma`` (objective Sigma);
    for an ordinary layer with ``lowrank='svd'`` the Sigma-SVD is done here directly and
    ``Go = W Sigma - A (A^T X Sigma)`` reuses ``W Sigma`` (computed once) and ``X Sigma`` (needed
    for the eigenproblem ``X Sigma X^T``).

    ``solve(R, Go, M, S0)`` returns values ``S`` on ``M`` and the objective error of ``R - S``:

    * exact (:func:`_solve_rows`); the Cholesky factors of the support's ``Sigma_JJ`` are kept
      (up to :data:`CACHE_BYTES`), so the rounds of a fixed-support descent cost two triangular
      solves per row.  The error comes from the identity (exact solutions, ``shift`` = the
      floor ``sigma_solve - sigma_obj``): ``err = sum(R Go) - sum(S Go) + shift sum(S (R - S))``.
    * or, when factorising this support is more expensive than ``cg_iter`` products with Sigma
      (``row_solver='auto'``; see :func:`lowrank_sparse`), ``cg_iter`` rounds of Jacobi
      preconditioned conjugate gradients on all rows at once, started from ``S0`` (the current
      values): CG lowers every row's objective monotonically from its start, so the step is
      still a descent step (not exact).  Error from the tracked ``S Sigma``.

    The iterate is what will be returned: ``lowrank`` rounds the factors to ``dt`` (``L`` and
    ``Go`` are those of the rounded factors), :meth:`settle` rounds the values (in the
    convention of ``mode``) and returns the exact float64 error of the result
    (:meth:`error`); the solver compares, keeps and reports only these errors.
    """

    def __init__(self, W, s_obj, s_solve, lr, row_solver="auto", cg_iter=30, dt=F64,
                 mode="additive"):
        self.W, self.s_obj, self.s_solve, self.lr = W, s_obj, s_solve, lr
        self.dt, self.mode = dt, mode
        self.row_solver, self.cg_iter = row_solver, max(1, int(cg_iter))
        self.fast = (lr.kind == "svd" and s_obj is not None and s_obj.dim() == 2
                     and lr.g == 1 and not lr.shared)
        self.WS = _sig_mul(W, s_obj) if self.fast else None
        self.shift = None
        self.cache = None                                     # (mask, factors)
        self.n_factor = self.n_cg = 0
        if s_obj is not None:
            sh = (torch.diagonal(s_solve, dim1=-2, dim2=-1)
                  - torch.diagonal(s_obj, dim1=-2, dim2=-1)).mean(-1)
            if sh.dim() == 1:                                   # grouped: one per group
                sh = sh.repeat_interleave(W.shape[0] // sh.shape[0])[:, None]
            self.shift = sh
            d = torch.diagonal(s_solve, dim1=-2, dim2=-1)
            if d.dim() == 2:
                d = d.repeat_interleave(W.shape[0] // d.shape[0], dim=0)
            self.dinv = 1.0 / d.clamp_min(1e-300)

    def lowrank(self, X):
        lr = self.lr
        T, D = self.W.shape
        if not self.fast:
            L, fac = lr.fit(X)
            if self.dt != F64 and fac:
                fac = tuple(rounded(f, self.dt) for f in fac)
                L = _lowrank_matrix(lr.kind, fac, T, D, F64, X.device)
            R = self.W - L
            return L, fac, (R if self.s_obj is None else _sig_mul(R, self.s_obj))
        XS = X @ self.s_obj
        w, V = eigh(XS @ X.T)                                     # ascending
        U = V[:, -lr.rank[0]:].flip(1)
        B = U.T @ X
        if self.dt == F64:
            return U @ B, (U, B), self.WS - U @ (U.T @ XS)
        U, B = rounded(U, self.dt), rounded(B, self.dt)
        return U @ B, (U, B), self.WS - U @ (B @ self.s_obj)

    def settle(self, R, Go, M, S, L):
        """Values ``S`` on ``M`` rounded to ``dt`` as they will be stored (additive: ``S``;
        masking: ``S + L``, the effective additive part then being ``round(S + L) - L``), and
        the exact error of ``R - S`` (``R = W - L``, ``Go = R Sigma``)."""
        if self.dt != F64:
            zero = torch.zeros((), dtype=F64, device=S.device)
            if self.mode == "additive":
                S = torch.where(M, rounded(S, self.dt), zero)
            else:
                S = torch.where(M, rounded(S + L, self.dt) - L, zero)
        return S, self.error(R, Go, S, M)

    def error(self, R, Go, S, M) -> float:
        """``sum_t (R - S)_t Sigma_t (R - S)_t^T`` in float64 with ``Go = R Sigma`` (objective):
        ``<Go, R> - 2 <S, Go> + <S Sigma, S>`` (``S Sigma`` a sparse product), from the explicit
        residual when the subtraction would lose digits."""
        if self.s_obj is None:
            E = R - S
            return float((E * E).sum())
        rr = float((Go * R).sum())
        quad = float((_sparse_sig_mul(S, M, self.s_obj) * S).sum())
        err = rr - 2.0 * float((S * Go).sum()) + quad
        if not err >= CANCEL * (abs(rr) + abs(quad)):
            err = _err(R - S, self.s_obj)
        return max(err, 0.0)

    def _affordable(self, M):
        """Factorising ``M``'s ``Sigma_JJ`` costs at most ``cg_iter`` products with Sigma."""
        if self.row_solver == "exact":
            return True
        if self.row_solver == "cg":
            return False
        T, D = M.shape
        c = M.sum(1).to(torch.float64)
        # measured (CPU, float64), in flops of a dense product: a batched Cholesky flop ~3, a
        # gathered element of Sigma_JJ ~400
        exact = float((c ** 3).sum()) + 400.0 * float((c * c).sum())
        return exact <= self.cg_iter * 2.0 * T * D * D

    def solve(self, R, Go, M, S0=None):
        if self.s_obj is None:
            S = torch.where(M, R, torch.zeros((), dtype=F64, device=R.device))
            E = R - S
            return S, float((E * E).sum())
        Gs = Go + self.shift * R
        hit = self.cache is not None and torch.equal(self.cache[0], M)
        if not hit and not self._affordable(M):
            # preconditioned with the cached factors of the current support when there are any
            # (exact there; a candidate support shares most of it)
            return self._cg(R, Go, Gs, M, S0, self.cache)[:2]
        if hit:
            fac = self.cache[1]
        else:
            fac = _factor_rows(self.s_solve, M)
            self.n_factor += 1
            if _factor_bytes(M) <= CACHE_BYTES:
                self.cache = (M, fac)
        S = _solve_rows(R, self.s_solve, M, Gs, factors=fac)
        err = float((R * Go).sum() - (S * Go).sum() + (self.shift * S * (R - S)).sum())
        return S, max(err, 0.0)

    def _precond(self, r, M, cache):
        """``z = P^{-1} r`` on the support ``M``: ``(Sigma_JJ^{-1})_KK`` on ``K = J cap M`` (``J``
        the cached support, a principal submatrix of an SPD inverse) and ``1 / Sigma_dd`` on
        ``M \\ J``: SPD, and exact when ``M = J``."""
        z = r * self.dinv
        if cache is not None:
            for rows, idx, v, Lc, _ in cache[1]:
                if Lc is None:
                    continue
                n, m = idx.shape
                rr = torch.where(v, r[rows[:, None], idx], torch.zeros((), dtype=F64, device=r.device))
                y = _chol_solve(Lc, rr[..., None])[..., 0]
                keep = v & M[rows[:, None], idx]
                z[rows[:, None].expand(n, m)[keep], idx[keep]] = y[keep]
        return torch.where(M, z, torch.zeros((), dtype=F64, device=z.device))

    def _cg(self, R, Go, Gs, M, S0, cache, gap=1e-5):
        """Preconditioned CG on every row's ``Sigma_JJ s_J = (Gs)_J`` from ``S0``, at most
        ``cg_iter`` products with Sigma.  Returns ``(S, err, converged)``; converged: a step
        lowered the error by less than ``gap`` times the error (stagnation)."""
        self.n_cg += 1
        s = self.s_solve
        zero = torch.zeros((), dtype=F64, device=R.device)
        X = torch.where(M, S0 if S0 is not None else R, zero)
        XS = _sig_mul(X, s)
        r = torch.where(M, Gs - XS, zero)
        z = self._precond(r, M, cache)
        p = z
        rz = (r * z).sum(1)
        def error():
            return float(((R - X) * (Go - (XS - self.shift * X))).sum())

        ok = False
        for _ in range(self.cg_iter):
            if ok:
                break
            Ap = _sig_mul(p, s)
            pAp = (p * Ap).sum(1)
            good = pAp > 0
            alpha = torch.where(good, rz / torch.where(good, pAp, 1.0), zero)[:, None]
            X = X + alpha * p
            XS = XS + alpha * Ap
            r = r - alpha * torch.where(M, Ap, zero)
            z = self._precond(r, M, cache)
            rz_new = (r * z).sum(1)
            # CG lowers the objective by alpha r^T z per step: stop once that stagnates
            ok = float((alpha[:, 0] * rz).sum()) <= gap * error()
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), zero)[:, None]
            p = z + beta * p
            rz = rz_new
        return X, max(error(), 0.0), ok


def _resolve_groups(weight, sigma, groups, name) -> int:
    """The layer's groups: from a 3-D ``sigma`` ``(g, D_g, D_g)`` or the ``groups`` keyword."""
    g_sig = int(sigma.shape[0]) if (isinstance(sigma, torch.Tensor) and sigma.dim() == 3) else None
    if groups is None:
        g = g_sig if g_sig is not None else 1
    else:
        g = int(groups)
        if g_sig is not None and g_sig != g:
            raise InputError(f"{layer_label(name)}: sigma has {g_sig} groups (shape "
                             f"{tuple(sigma.shape)}) but groups={g}",
                             hint="pass the layer's groups value, or omit it to infer it "
                                  "from sigma")
    T = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() else 0
    if g < 1 or (T and T % g):
        raise InputError(f"{layer_label(name)}: {T} output channels cannot be split into {g} groups",
                         hint="pass the conv's groups value")
    if g > 1 and (not isinstance(weight, torch.Tensor) or weight.dim() != 4):
        raise InputError(f"{layer_label(name)}: groups={g} needs a conv kernel (T, S/g, kh, kw)",
                         hint="pass the grouped conv's weight as it is stored in the layer")
    if g > 1 and sigma is not None and sigma.dim() != 3:
        raise InputError(f"{layer_label(name)}: groups={g} needs a sigma of shape (g, D_g, D_g), got "
                         f"{tuple(sigma.shape)}", hint="pass one input covariance per group")
    return g


def _prepare_sigma(sigma, g, D, *, damping, eps_rel, device, name):
    """:func:`ddtd.solvers._common.prepare_sigma` for one ``(D, D)`` Sigma or a ``(g, D, D)``
    stack (each group floored / damped relative to its own mean diagonal; a group that never
    saw input energy (zero Sigma: its rows do not count) is floored relative to the layer's)."""
    if sigma is None:
        return None, None
    if sigma.dim() == 3 and g == 1:
        sigma = sigma[0]
    if sigma.dim() == 2:
        return prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=device, name=name)
    if tuple(sigma.shape) != (g, D, D):
        raise InputError(f"{layer_label(name)}: sigma has shape {tuple(sigma.shape)}, expected "
                         f"({g}, {D}, {D})", hint="a grouped conv's sigma is one (D_g, D_g) "
                         "covariance of the unfolded group input per group, D_g = (S/g)*kh*kw")
    check_finite(sigma, "sigma", name)
    s = sigma.to(device=device, dtype=F64)
    s = 0.5 * (s + s.transpose(1, 2))
    md = torch.diagonal(s, dim1=1, dim2=2).mean(1)                      # (g,)
    tot = float(md.clamp_min(0).mean())
    if tot <= 0:
        raise InputError(f"{layer_label(name)}: sigma has zero trace (the layer never saw any input "
                         "energy)", hint="check the calibration store for this layer, or use "
                                         "norm 'frobenius'")
    md = torch.where(md > 0, md, torch.full_like(md, tot))
    eye = torch.eye(D, dtype=F64, device=device)
    if damping:
        s = s + damping * md[:, None, None] * eye
    return s, s + eps_rel * md[:, None, None] * eye


def _check_args(weight, sigma, rank, nnz, density, mode, init, lowrank, name, groups=None):
    if mode not in MODES:
        raise InputError(f"{layer_label(name)}: unknown mode {mode!r}", hint=f"use one of {MODES}")
    if init not in INITS:
        raise InputError(f"{layer_label(name)}: unknown init {init!r}", hint=f"use one of {INITS}")
    if lowrank not in LOWRANKS:
        raise InputError(f"{layer_label(name)}: unknown lowrank format {lowrank!r}",
                         hint=f"use one of {LOWRANKS}")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise InputError(f"{layer_label(name)}: weight must be (T, D) or (T, S/g, kh, kw), got {shape}",
                         hint="pass the Linear weight or the conv kernel")
    g = _resolve_groups(weight, sigma, groups, name)
    shared = _is_shared(tuple(weight.shape), g)
    T = weight.shape[0]
    D = int(math.prod(weight.shape[1:]))
    if (nnz is None) == (density is None):
        raise InputError(f"{layer_label(name)}: pass exactly one of nnz and density",
                         hint="e.g. nnz=1000 or density=0.1 (fraction of the T*D entries)")
    if density is not None:
        if not 0.0 <= float(density) <= 1.0:
            raise InputError(f"{layer_label(name)}: density {density} is outside [0, 1]",
                             hint="density is the fraction of nonzero entries of the sparse part")
        nnz = int(round(float(density) * T * D))
    nnz = int(nnz)
    if not 0 <= nnz <= T * D:
        raise InputError(f"{layer_label(name)}: nnz {nnz} is outside [0, T*D = {T * D}]",
                         hint="choose fewer nonzeros")
    if T * D >= 2 ** 31:
        raise InputError(f"{layer_label(name)}: T*D = {T * D} does not fit an int32 flat index",
                         hint="this layer is too large for the sparse format; leave it dense")
    if lowrank == "tucker2" and weight.dim() != 4:
        raise InputError(f"{layer_label(name)}: lowrank='tucker2' needs a conv kernel (T, S, kh, kw)",
                         hint="use lowrank='svd' for Linear layers")
    if lowrank == "tt":
        _check_tt(weight, rank, g, name)
    if isinstance(rank, int) or lowrank == "svd":
        rr = [int(rank if isinstance(rank, int) else rank[0])]
    else:
        rr = [int(x) for x in rank]
    if min(rr) < 0:
        raise InputError(f"{layer_label(name)}: rank {rank} is negative", hint="use rank >= 0")
    Tg = T // g
    if lowrank == "svd":
        if g == 1:
            rmax, what = min(T, D), f"min(T, D) = {min(T, D)}"
        elif shared:
            rmax, what = min(T, D), f"min(T, kh*kw) = {min(T, D)} (depthwise: shared basis)"
        else:
            rmax, what = min(Tg, D), f"min(T/g, D_g) = {min(Tg, D)} (per group)"
        if rr[0] > rmax:
            raise InputError(f"{layer_label(name)}: rank {rr[0]} exceeds {what}",
                             hint="choose a smaller rank")
    if lowrank == "tucker2" and shared and max(rr) > 0:
        raise InputError(f"{layer_label(name)}: lowrank='tucker2' makes no sense for a depthwise conv "
                         "(one input channel per group)",
                         hint="use lowrank='svd' (shared basis filters across channels)")
    if lowrank == "tucker2" and min(rr) > 0:
        R1, R2 = (rr[0], rr[0]) if len(rr) == 1 else rr
        if R1 > Tg or R2 > weight.shape[1]:
            raise InputError(f"{layer_label(name)}: Tucker2 ranks ({R1}, {R2}) invalid for "
                             f"T/g={Tg}, S/g={weight.shape[1]}",
                             hint="need R1 <= T/g and R2 <= S/g")
    kind = lowrank if max(rr) > 0 else "none"
    return nnz, kind, T, D, g


def _check_tt(weight, rank, g, name) -> None:
    """A TT-matrix low-rank part: a Linear weight or an ungrouped 1x1 kernel, bond ranks all
    >= 1 (or all 0: no low-rank part)."""
    if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
        raise InputError(f"{layer_label(name)}: lowrank='tt' (a TT-matrix) takes a Linear weight or a 1x1 "
                         f"conv kernel, got {tuple(weight.shape)}",
                         hint="use lowrank='tucker2' or 'svd' for k x k convs")
    if g > 1:
        raise InputError(f"{layer_label(name)}: lowrank='tt' does not split groups (groups={g})",
                         hint="use lowrank='svd' for grouped convs")
    rr = [rank] if isinstance(rank, int) else list(rank)
    if not rr or any(isinstance(r, bool) or not isinstance(r, int) for r in rr) or (
            0 in rr and max(rr) > 0):
        raise InputError(f"{layer_label(name)}: TT ranks {rank!r} invalid",
                         hint="one int or one int per bond, all >= 1 (0: no low-rank part)")


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
                   damping: float = default_damping("lrs"), eps_rel: float = EPS_REL, device=None,
                   dtype: torch.dtype | None = None, name: str | None = None,
                   groups: int | None = None, basis_iter: int = 10,
                   row_solver: str = "auto", cg_iter: int = 30, tt_modes=None) -> LRSResult:
    """Fit ``W~ = L + S`` (or the masking form) to ``weight`` in the Sigma metric.

    Args:
        weight: ``(T, D)`` Linear weight or ``(T, S/g, kh, kw)`` conv kernel (any groups).
        sigma: ``(D, D)`` PSD input covariance, ``(g, D_g, D_g)`` for a grouped / depthwise
            conv, or ``None`` (Frobenius).
        rank: svd ``r`` (int; per group for a grouped conv, the number of shared basis filters
            for a depthwise conv); tucker2 ``(R1, R2)`` or one int (per group); tt one int for
            every bond or one per bond (``d - 1`` for ``d`` cores; clipped to
            :func:`ddtd.solvers.formats.tt_max_ranks`); ``0`` = no low-rank part.
        nnz: number of nonzeros of the sparse part (or give ``density`` = nnz / (T*D)); grouped:
            over the whole layer, the groups compete for them.
        mode: ``'additive'`` (``L + S``) or ``'masking'`` (``(1-M).L + M.S_m``); same fit (module
            docstring), different stored values.
        init: ``'residual'`` (the paper, eq. 12), ``'masked'`` (the paper, eq. 13-14), ``'data'``, or
            ``'auto'``: the full fit from each of the three, the best kept (3x the time).  The
            fit is a block descent and can stall in a local minimum: on planted low-rank +
            spikes problems only the masked start recovers the exact decomposition, while on
            activation-weighted layers the data start usually ends lowest.
        lowrank: ``'svd'``, ``'tucker2'`` (``k x k`` conv) or ``'tt'`` (TT-matrix: Linear
            layer or ungrouped 1x1 conv).
        max_iter: rounds of the data-driven fit; ``0`` returns the initialisation.
        tol: stop when a round lowers the error by less than ``tol`` (relative).
        init_iter: alternation rounds of the ``'masked'`` initialisation's low-rank fit.
        tucker_iter: Tucker2 / TT ALS iterations per (a) step.
        candidates: new-support rules tried when the fixed-support descent stalls: any of
            ``'energy'``, ``'gradient'`` (module docstring); ``()`` keeps the initial support.
        switch_tol: a round that lowers the error by less than this (relative) counts as
            stalled and triggers the support proposals.
        damping: fit in ``Sigma + damping * mean(diag(Sigma)) * I`` (per group; the objective of
            every reported error).  Default ``DAMPING = 1e-3`` (:func:`ddtd.solvers.default_damping`,
            the pipeline's rule): the sparse values are solved exactly in this metric, and
            undamped they overfit directions the calibration samples never excite.
        eps_rel: floor for the row solves, see :func:`ddtd.solvers._common.prepare_sigma`.
        device, dtype: compute device; dtype of returned factors / values (float32 default;
            the fit runs in float64, each iterate rounded to ``dtype`` before its error is
            taken).
        name: layer name, for error messages.
        groups: the conv's groups (inferred from a 3-D ``sigma``; give it when ``sigma`` is
            ``None``).  See the module docstring for the grouped and depthwise models.
        basis_iter: alternation rounds of the depthwise shared-basis fit per (a) step.
        row_solver: the row solves (module docstring, "Cost"): ``'auto'`` (exact, cached
            Cholesky factorisations; conjugate gradients when factorising a support costs more
            than ``cg_iter`` products with Sigma), ``'exact'`` (always factorise) or ``'cg'``
            (always conjugate gradients, a descent step per solve).
        cg_iter: cap on the conjugate-gradient steps (products with Sigma) per row solve.
        tt_modes: ``(out_modes, in_modes)`` of the TT-matrix (``lowrank='tt'``); default
            :func:`ddtd.solvers.formats.tt_matrix_modes` (balanced factors, one core more than
            the bond ranks given, :data:`ddtd.solvers.formats.DEFAULT_TT_CORES` for an int).

    Returns:
        :class:`LRSResult`.
    """
    t0 = time.perf_counter()
    nnz, kind, T, D, g = _check_args(weight, sigma, rank, nnz, density, mode, init, lowrank,
                                     name, groups)
    if init == "auto":
        kw = dict(mode=mode, lowrank=lowrank, max_iter=max_iter, tol=tol, init_iter=init_iter,
                  tucker_iter=tucker_iter, candidates=candidates, switch_tol=switch_tol,
                  damping=damping, eps_rel=eps_rel, device=device, dtype=dtype, name=name,
                  groups=g, basis_iter=basis_iter, row_solver=row_solver, cg_iter=cg_iter,
                  tt_modes=tt_modes)
        runs = [lowrank_sparse(weight, sigma, rank, nnz, init=i, **kw) for i in INITS[:3]]
        best = min(runs, key=lambda r: r.rel_error)
        return dataclasses.replace(best, seconds=time.perf_counter() - t0)
    W, s_obj, s_solve, dev, dt = _matrix_and_metric(weight, sigma, (T, D, g), device, dtype, damping, eps_rel, name)
    base = _err(W, s_obj)
    if base <= 0:
        raise InputError(f"{layer_label(name)}: the weight carries no energy in the Sigma metric "
                         "(W Sigma W^T = 0)", hint="the layer's output is constant; leave it dense")
    dsq = _row_dsq(s_obj, T, D, dev)
    lr = _LowRank(kind, rank, tuple(weight.shape), g, s_obj, s_solve, tucker_iter, basis_iter,
                  name, tt_modes)

    if row_solver not in ROW_SOLVERS:
        raise InputError(f"{layer_label(name)}: unknown row_solver {row_solver!r}",
                         hint=f"use one of {ROW_SOLVERS}")
    st = _Steps(W, s_obj, s_solve, lr, row_solver, cg_iter, dt, mode)
    zero = torch.zeros((), dtype=F64, device=dev)

    # ---- initialisation
    if init == "residual":
        L, fac, Go = st.lowrank(W)
        R = W - L
        M = _topk_mask(R.abs(), nnz)
        S, err = st.settle(R, Go, M, torch.where(M, R, zero), L)
    elif init == "masked":
        M = _topk_mask(W.abs(), nnz)
        S = torch.zeros_like(W)
        e_prev = math.inf
        for _ in range(max(1, init_iter)):
            L, fac, Go = st.lowrank(W - S)
            S, _ = st.solve(W - L, Go, M, S)
            S, err = st.settle(W - L, Go, M, S, L)
            if e_prev - err <= switch_tol * e_prev:        # the frozen-support descent stalled
                break
            e_prev = err
        if s_obj is None:
            S, err = st.settle(W - L, Go, M, torch.where(M, W - L, zero), L)
    else:
        L, fac, Go = st.lowrank(W)
        R = W - L
        M = _topk_mask(R.abs() * dsq, nnz)
        S, _ = st.solve(R, Go, M)
        S, err = st.settle(R, Go, M, S, L)
    if not math.isfinite(err):
        raise diverged(name, "lowrank_sparse", "non-finite initial error")
    init_rel = err / base
    best = (err, L, fac, S, M)
    hist = [init_rel]
    converged = False
    it = 0

    # ---- data-driven fit
    cur = err
    rejected = []                      # candidate supports rejected in the previous round
    wait, backoff = {}, {}             # per proposal rule: stalled rounds to skip, last skip
    for it in range(1, max_iter + 1):
        L, fac, Go = st.lowrank(W - S)
        R = W - L
        S, _ = st.solve(R, Go, M, S)
        S, e_keep = st.settle(R, Go, M, S, L)
        # new supports only once the fixed-support descent stalls (see the module docstring)
        stalled = cur - e_keep <= switch_tol * cur
        if stalled:
            # each proposal rule that fails is skipped for the next 1, 2, 4, 8 stalled rounds
            # (a proposal costs a fresh factorisation; the fixed-support rounds reuse theirs),
            # and a proposal identical to one rejected last round is not re-solved
            cands = []
            for rule in candidates:
                if rule == "gradient" and s_obj is None:
                    continue
                if wait.get(rule, 0) > 0:
                    wait[rule] -= 1
                    continue
                if rule == "energy":
                    cands.append((rule, _topk_mask(R.abs() * dsq, nnz)))
                elif rule == "gradient":
                    Z = S + (Go - _sig_mul(S, s_obj)) / (dsq * dsq).clamp_min(1e-300)
                    cands.append((rule, _topk_mask(Z.abs() * dsq, nnz)))
            new_rejected = []
            for rule, Mc in cands:
                if torch.equal(Mc, M) or any(torch.equal(Mc, x) for x in rejected):
                    continue
                Sc, _ = st.solve(R, Go, Mc, torch.where(M, S, R))
                Sc, ec = st.settle(R, Go, Mc, Sc, L)
                if ec < e_keep:
                    e_keep, S, M = ec, Sc, Mc
                    backoff[rule] = 0
                else:
                    new_rejected.append(Mc)
                    backoff[rule] = min(2 * backoff.get(rule, 0) or 1, 8)
                    wait[rule] = backoff[rule]
            rejected = new_rejected
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
    factors = tuple(f.to(dt) for f in fac)
    info = {"damping": float(damping) if sigma is not None else 0.0,
            **fit_diagnostics(W, L + S)}
    return LRSResult(tuple(weight.shape), kind, factors, lr.rank, idx, vals.to(dt), mode, init_rel,
                     rel_error=err / base, history=hist, n_iter=it, converged=converged,
                     seconds=time.perf_counter() - t0, groups=g, info=info)


# --------------------------------------------------------------------------------------------
# pruning baselines
# --------------------------------------------------------------------------------------------

def _matrix_and_metric(weight, sigma, dims, device, dtype, damping, eps_rel, name):
    """``(W (T, D) float64, Sigma objective, Sigma to solve with, device, dtype)`` of a layer."""
    T, D, g = dims
    dev, dt = resolve_device_dtype(weight, device, dtype)
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = _prepare_sigma(sigma, g, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    return W, s_obj, s_solve, dev, dt


def _prune(weight, sigma, nnz, density, score_fn, solve, name, dtype, device, groups, damping):
    nnz, _, T, D, g = _check_args(weight, sigma, 0, nnz, density, "additive", "data", "svd",
                                  name, groups)
    W, s_obj, s_solve, dev, dt = _matrix_and_metric(weight, sigma, (T, D, g), device, dtype, damping, EPS_REL, name)
    base = _err(W, s_obj)
    dsq = _row_dsq(s_obj, T, D, dev)
    M = _topk_mask(score_fn(W, dsq), nnz)
    S = solve_rows(W, s_solve, M) if solve else torch.where(M, W, torch.zeros((), dtype=F64, device=dev))
    S = torch.where(M, rounded(S, dt), torch.zeros((), dtype=F64, device=dev))
    rel = _err(W - S, s_obj) / base if base > 0 else 0.0
    idx, vals = _pack(S, M)
    info = {"damping": float(damping) if sigma is not None else 0.0, **fit_diagnostics(W, S)}
    return LRSResult(tuple(weight.shape), "none", (), (0,), idx, vals.to(dt), "additive", rel,
                     rel_error=rel, history=[rel], n_iter=0, converged=True, groups=g, info=info)


def magnitude_prune(weight: torch.Tensor, sigma: torch.Tensor | None, nnz: int | None = None, *,
                    density: float | None = None, dtype: torch.dtype | None = None, device=None,
                    name: str | None = None, groups: int | None = None,
                    damping: float = default_damping("sparse")) -> LRSResult:
    """Baseline: keep the ``nnz`` largest ``|W_ij|`` unchanged, zero the rest (global magnitude
    pruning of the layer; grouped: over all groups).  ``sigma`` is only used for the reported
    error, in ``Sigma + damping * mean(diag(Sigma)) * I`` (default ``DAMPING = 1e-3``, the rule
    of :func:`ddtd.solvers.default_damping`).  Returns an :class:`LRSResult` with
    ``lowrank='none'``; its error is that of the values rounded to ``dtype``."""
    return _prune(weight, sigma, nnz, density, lambda W, d: W.abs(), False, name, dtype, device,
                  groups, damping)


def sigma_prune(weight: torch.Tensor, sigma: torch.Tensor | None, nnz: int | None = None, *,
                density: float | None = None, dtype: torch.dtype | None = None, device=None,
                name: str | None = None, groups: int | None = None,
                damping: float = default_damping("sparse")) -> LRSResult:
    """Data-aware pruning baseline: support = the ``nnz`` largest ``|W_ij| sqrt(Sigma_jj)``, values
    re-solved exactly in the Sigma metric on that support (:func:`solve_rows` with ``R = W``), so
    the kept weights compensate the pruned ones through the input correlations.  (Equals
    ``lowrank_sparse(..., rank=0, init='data', max_iter=0)``; grouped: one support over all
    groups, each row solved in its group's Sigma.)  Sigma is damped: ``Sigma + damping *
    mean(diag(Sigma)) * I`` (default ``DAMPING = 1e-3``, :func:`ddtd.solvers.default_damping`);
    the reported error is that of the values rounded to ``dtype``."""
    return _prune(weight, sigma, nnz, density, lambda W, d: W.abs() * d, True, name, dtype, device,
                  groups, damping)


# --------------------------------------------------------------------------------------------
# budget split
# --------------------------------------------------------------------------------------------

def split_budget(weight: torch.Tensor, sigma: torch.Tensor | None, budget: int, *,
                 lowrank: str = "svd", fractions=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0),
                 max_iter: int = 8, name: str | None = None, groups: int | None = None,
                 search: str = "refine", **kwargs):
    """Split a storage ``budget`` (4-byte units, see :data:`INDEX_UNITS`) between the rank and the
    nonzeros so that the Sigma error is smallest.

    For each fraction ``f`` the low-rank part gets the largest rank whose factors fit in
    ``f * budget`` (svd: ``r = floor(f B / u)`` with ``u = lowrank_params(shape, 'svd', 1, g)``
    the cost of one rank: ``T + D`` (grouped ``g (T_g + D_g)``, depthwise ``T + kh kw``);
    tucker2: ``R1 = R2 = R``, the largest with ``lowrank_params <= f B``; tt: the largest uniform
    bond rank (clipped per bond) whose cores fit, for the modes ``kwargs['tt_modes']`` or the
    default ones) and the sparse part the
    rest: ``nnz = floor((B - lowrank_params) / (1 + INDEX_UNITS))``.  ``f = 0`` is pure sparse
    (Sigma-aware pruning), ``f = 1`` pure low rank.  Each split is fitted with
    :func:`lowrank_sparse` (``max_iter`` rounds, ``init='data'`` unless given in ``kwargs``,
    extra ``kwargs`` passed on); refit the chosen split with more rounds / ``init='auto'`` if
    wanted.  ``groups``: as in :func:`lowrank_sparse` (inferred from a 3-D ``sigma``).

    ``search='refine'`` (default) fits the coarse grid first (every other fraction and the last
    one), then the untried neighbours of the best fraction until the best stays put (5-7 of the
    8 default fractions; assumes the error is unimodal in the fraction, which it was in every
    layer measured); ``'grid'`` fits every fraction.

    Returns:
        ``(rank, nnz, result, table)``: the best split, its :class:`LRSResult`, and
        ``[(fraction, rank, nnz, rel_error), ...]`` for every split tried.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise InputError(f"{layer_label(name)}: weight must be (T, D) or (T, S/g, kh, kw)",
                         hint="pass the Linear weight or the conv kernel")
    g = _resolve_groups(weight, sigma, groups, name)
    shape = tuple(weight.shape)
    T = shape[0]
    D = int(math.prod(shape[1:]))
    shared = _is_shared(shape, g)
    budget = int(budget)
    if budget < 1 + INDEX_UNITS:
        raise InputError(f"{layer_label(name)}: budget {budget} is too small for even one nonzero",
                         hint="give a budget of at least 2 units")
    if lowrank == "tucker2" and shared:
        raise InputError(f"{layer_label(name)}: lowrank='tucker2' makes no sense for a depthwise conv "
                         "(one input channel per group)",
                         hint="use lowrank='svd' (shared basis filters across channels)")
    if lowrank == "tt":
        _check_tt(weight, 1, g, name)
    if search not in ("refine", "grid"):
        raise InputError(f"{layer_label(name)}: unknown search {search!r}",
                         hint="use 'refine' or 'grid'")
    kwargs.setdefault("init", "data")
    fr = sorted(float(f) for f in fractions)
    if search == "grid" or len(fr) <= 4:
        order = list(range(len(fr)))
    else:                                   # coarse grid first (every other fraction + the last)
        order = sorted(set(range(0, len(fr), 2)) | {len(fr) - 1})
    done = {}                                           # fraction index -> table row
    table, best = [], None
    tried = set()
    while order:
        for i in order:
            row = _split_one(weight, sigma, budget, fr[i], lowrank, shape, T, D, g, shared, tried,
                             max_iter, name, kwargs)
            done[i] = row
            if row is None:
                continue
            table.append(row[0])
            if best is None or row[1][2].rel_error < best[2].rel_error:
                best = row[1]
        if search == "grid" or best is None:
            break
        # refine: the untried neighbours of the best fraction, until the best stays put
        ib = next(i for i, r in done.items() if r is not None and r[1] is best)
        order = [j for j in (ib - 1, ib + 1) if 0 <= j < len(fr) and j not in done]
    if best is None:
        raise InputError(f"{layer_label(name)}: no split of budget {budget} is feasible",
                         hint="increase the budget")
    table.sort(key=lambda row: row[0])
    return best[0], best[1], best[2], table


def _split_one(weight, sigma, budget, f, lowrank, shape, T, D, g, shared, tried, max_iter, name,
               kwargs):
    """Fit the split at fraction ``f``: ``((f, r, nnz, err), (rank, nnz, result))`` or ``None``
    (infeasible, or the same split as an earlier fraction)."""
    lb = f * budget
    rk = rank_for_units(shape, lowrank, lb, g, tt_modes=kwargs.get("tt_modes"))
    r = rk if isinstance(rk, int) else max(rk)
    nnz = (budget - lowrank_params(shape, lowrank, rk, g, tt_modes=kwargs.get("tt_modes"))) \
        // (1 + INDEX_UNITS)
    nnz = max(0, min(int(nnz), T * D))
    if (r, nnz) in tried or (r == 0 and nnz == 0):
        return None
    tried.add((r, nnz))
    res = lowrank_sparse(weight, sigma, rk, nnz, lowrank=lowrank, max_iter=max_iter,
                         name=name, groups=g, **kwargs)
    return (float(f), r, nnz, res.rel_error), (rk, nnz, res)
