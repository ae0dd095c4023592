"""Tensor-train (TT) formats of a layer weight, fitted in the Sigma metric or the Frobenius norm.

Sources: I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5):2295-2317,
2011 (TT format, TT-SVD); A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov, "Tensorizing Neural
Networks", NeurIPS 2015 (TT-matrix layers); T. Garipov, D. Podoprikhin, A. Novikov, D. Vetrov,
"Ultimate tensorization: compressing convolutional and FC layers alike", arXiv:1611.03214, 2016
(TT convolutions); J. Su, J. Li, B. Bhattacharjee, F. Huang, "Tensorial neural networks:
generalization of neural networks and application to model compression", arXiv:1805.10352, 2018
(the four-factor TT convolution); U. Sainz de la Maza Gamboa, "Tensor Decompositions for Neural
Networks Compression", Master's thesis, University of the Basque Country (UPV/EHU), Faculty of
Informatics (TT convolution parameter and multiply-add counts, Table 6.1, and the pretrained CIFAR-10
networks that TT fitted to the weights alone fails to approximate without fine-tuning).

**TT-matrix** of ``W (T x D)`` with ``T = t_1 ... t_d`` and ``D = d_1 ... d_d`` (row and column
indices in C order of their modes)::

    W~[(t_1..t_d), (i_1..i_d)] = G_1[:, t_1, i_1, :] G_2[:, t_2, i_2, :] ... G_d[:, t_d, i_d, :]

cores ``G_k (r_{k-1}, t_k, d_k, r_k)``, ``r_0 = r_d = 1``; bond ``k`` can carry at most
``min(prod_{j<=k} t_j d_j, prod_{j>k} t_j d_j)`` (:func:`tt_max_ranks`).  The mode
factorisations default to balanced factors (:func:`tt_matrix_modes`).

**TT convolution** of a kernel ``K (T, S, kh, kw)``::

    K~[t, s, y, x] = sum C[s, r1] Y[r1, y, r2] X[r2, x, r3] T[r3, t]

which is the TT-matrix of ``W = K.reshape(T, S*kh*kw)`` with output modes ``(1, 1, 1, T)`` and
input modes ``(S, kh, kw, 1)`` (the column order of ``F.unfold``).  Layers: 1x1 ``S -> R1``,
``kh x 1`` ``R1 -> R2``, ``1 x kw`` ``R2 -> R3``, 1x1 ``R3 -> T``.

**Frobenius baseline** (``sigma=None``): TT-SVD (sequential truncated SVDs of the unfoldings,
Oseledets 2011, Alg. 1) followed by ALS sweeps in the Frobenius norm.

**TT-ALS-Sigma.**  ``W~`` is linear in each core: ``vec(W~) = Phi_k vec(G_k)``.  With the other
cores fixed, ``min ||(W - W~) Sigma^{1/2}||_F^2`` over ``G_k`` is linear least squares with normal
equations ``Phi_k^T (I (x) Sigma) Phi_k g = Phi_k^T vec(W Sigma)``:

* The operator is applied matrix-free (:func:`_sweep`): build ``W~(G)`` from the left interface
  (cores ``< k``) and the right interface (cores ``> k``), multiply by ``Sigma``, contract back
  with both interfaces.  It is solved by preconditioned conjugate gradients warm-started at the
  current core; cores left of ``k`` are kept left-orthogonal and right of ``k`` right-orthogonal
  (QR gauge moves that leave ``W~`` unchanged), so that for ``Sigma = I`` the operator is the
  identity.  Preconditioner: the exact inverse of the operator with ``Sigma`` replaced by the
  Kronecker product ``Sigma_< (x) Sigma_k (x) Sigma_>`` of its partial traces over the input
  modes before, at and after ``k``.
* TT convolution: the output core ``T`` is the output factor of ``W~ = T^T M^T`` with
  ``M (D x R3)`` the TT of ``(C, Y, X)``, so its optimum is closed form (as CP's output factor):
  ``T^T = W Sigma M (M^T Sigma M)^{-1}``.  With ``T^T = Q R`` (QR), the input cores solve the
  same TT-matrix problem for the ``R3 x D`` matrix ``Q^T W`` (``R`` folded into ``X``), whose
  normal operator costs one ``R3 x D`` by ``D x D`` product per application.
* Start: the TT-SVD of the weight whitened with the Kronecker approximation of Sigma over the
  input modes (``W (L_1 (x) ... (x) L_d)``, ``L_k = Sigma_k^{1/2}``, which keeps the TT ranks of
  ``W``), with the whitening undone in each core's input mode (``G_k x_in L_k^{-1}``).
* Every sweep only lowers the objective (CG steps in ``dtype`` up to their tolerance); the error
  of every iterate is exact (float64, cores rounded to ``dtype``), the iterate of least error is
  returned and the history is the running best (non-increasing).  Damping as in the other
  solvers (:func:`ddtd.solvers.default_damping`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, layer_label

from ._common import (EPS_REL, F64, BestIterate, IterativeResult, check_finite, combine_histories,
                      default_damping, diverged, eigh, error_from_terms, fit_diagnostics, frob_sq,
                      partial_traces, pcg, prepare_sigma, qr, resolve_device_dtype, rounded,
                      sigma_error, spd_solve, split_groups, top_left_singular)
from .formats import DEFAULT_TT_CORES, tt_conv_ranks, tt_matrix_modes, tt_matrix_ranks

__all__ = ["TTConvResult", "TTMatrixResult", "tt_conv", "tt_matrix", "tt_svd", "tt_matrix_svd", "tt_full"]

# ----------------------------------------------------------------------------- TT algebra


def tt_full(cores: list[torch.Tensor]) -> torch.Tensor:
    """``W~ (T, D)`` of TT-matrix ``cores`` ``(r_{k-1}, t_k, d_k, r_k)``."""
    X = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], cores[0].shape[3])
    for G in cores[1:]:
        Tl, Dl, _ = X.shape
        _, t, d, r = G.shape
        X = torch.einsum("pqa,atdb->ptqdb", X, G).reshape(Tl * t, Dl * d, r)
    return X[..., 0]


def _interfaces(cores, k):
    """Left interface ``(T_<, D_<, r_{k-1})`` of cores ``< k`` and right interface
    ``(r_k, T_>, D_>)`` of cores ``> k``."""
    ref = cores[k]
    L = torch.ones(1, 1, 1, dtype=ref.dtype, device=ref.device)
    for G in cores[:k]:
        Tl, Dl, _ = L.shape
        _, t, d, r = G.shape
        L = torch.einsum("pqa,atdb->ptqdb", L, G).reshape(Tl * t, Dl * d, r)
    R = torch.ones(1, 1, 1, dtype=ref.dtype, device=ref.device)
    for G in reversed(cores[k + 1:]):
        _, Tr, Dr = R.shape
        r0, t, d, _ = G.shape
        R = torch.einsum("atdb,bmn->atmdn", G, R).reshape(r0, t * Tr, d * Dr)
    return L, R


def _build(L, G, R):
    """``W~ (T, D)`` with core ``k`` replaced by ``G`` (interfaces ``L``, ``R``)."""
    X = torch.tensordot(G, R, dims=([3], [0]))                 # (a, t, d, m, n)
    Y = torch.tensordot(L, X, dims=([2], [0]))                 # (p, q, t, d, m, n)
    p, q, t, d, m, n = Y.shape
    return Y.permute(0, 2, 4, 1, 3, 5).reshape(p * t * m, q * d * n)


def _adjoint(L, Y, R, shape):
    """``Phi_k^T vec(Y)`` for ``Y (T, D)``, shaped like the core ``(a, t, d, b)``."""
    a, t, d, b = shape
    p, q = L.shape[0], L.shape[1]
    m, n = R.shape[1], R.shape[2]
    Y6 = Y.reshape(p, t, m, q, d, n)
    Z = torch.tensordot(Y6, R, dims=([2, 5], [1, 2]))          # (p, t, q, d, b)
    out = torch.tensordot(L, Z, dims=([0, 1], [0, 2]))         # (a, t, d, b)
    return out


def _orth_left(cores, k):
    """Make core ``k`` left-orthogonal (QR of ``(r_{k-1} t d, r_k)``), ``R`` into core ``k+1``."""
    a, t, d, b = cores[k].shape
    Q, Rm = qr(cores[k].reshape(a * t * d, b))
    cores[k] = Q.reshape(a, t, d, Q.shape[1])
    cores[k + 1] = torch.tensordot(Rm, cores[k + 1], dims=([1], [0]))


def _orth_right(cores, k):
    """Make core ``k`` right-orthogonal (QR of its ``(r_{k-1}, t d r_k)`` transpose), the
    triangular factor into core ``k-1``."""
    a, t, d, b = cores[k].shape
    Q, Rm = qr(cores[k].reshape(a, t * d * b).T)
    cores[k] = Q.T.reshape(Q.shape[1], t, d, b)
    cores[k - 1] = torch.tensordot(cores[k - 1], Rm.T, dims=([3], [0]))


def tt_svd(tensor: torch.Tensor, ranks) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) of an order-``n`` tensor at bond ranks ``ranks`` (an int
    for every bond or ``n - 1`` ints; clipped to the unfolding sizes): cores ``(r_{k-1}, n_k,
    r_k)``, all but the last left-orthogonal, float64.  Quasi-optimal in the Frobenius norm:
    ``err^2 <= sum_k (discarded squared singular values of unfolding k)``."""
    dims = tuple(tensor.shape)
    nb = len(dims) - 1
    rs = (int(ranks),) * nb if isinstance(ranks, int) else tuple(int(r) for r in ranks)
    if len(rs) != nb:
        raise InputError(f"tt_svd: {len(rs)} ranks for an order-{len(dims)} tensor",
                         hint=f"give one int or {nb} ints")
    C = tensor.to(F64)
    cores, r_prev = [], 1
    for k in range(nb):
        C = C.reshape(r_prev * dims[k], -1)
        r = max(1, min(rs[k], *C.shape))
        U = top_left_singular(C, r)
        cores.append(U.reshape(r_prev, dims[k], r))
        C = U.T @ C
        r_prev = r
    cores.append(C.reshape(r_prev, dims[-1], 1))
    return cores


def tt_matrix_svd(W: torch.Tensor, out_modes, in_modes, ranks) -> list[torch.Tensor]:
    """TT-matrix-SVD of ``W (T, D)``: the TT-SVD of the tensor with modes ``(t_k, d_k)`` merged
    (Novikov et al. 2015), cores ``(r_{k-1}, t_k, d_k, r_k)``, float64."""
    om, im = tuple(out_modes), tuple(in_modes)
    d = len(om)
    X = W.to(F64).reshape(*om, *im)
    perm = [i for k in range(d) for i in (k, d + k)]
    X = X.permute(*perm).reshape(*[t * i for t, i in zip(om, im)])
    rs = tt_matrix_ranks(ranks, om, im)
    cores3 = tt_svd(X, rs)
    return [G.reshape(G.shape[0], t, i, G.shape[2]) for G, t, i in zip(cores3, om, im)]


def _sqrt_pair(A: torch.Tensor):
    """``(A^{1/2}, A^{-1/2})`` of a symmetric PSD ``A`` (eigenvalues floored at 1e-12 max)."""
    w, Q = eigh(0.5 * (A + A.T))
    w = w.clamp_min(float(w.max().clamp_min(1e-300)) * 1e-12)
    return (Q * w.sqrt()) @ Q.T, (Q / w.sqrt()) @ Q.T


def _whitened_init(W, sigma, om, im, ranks):
    """TT-SVD of ``W`` whitened with the Kronecker approximation of Sigma over the input modes,
    the whitening undone in each core (module docstring)."""
    if sigma is None:
        return tt_matrix_svd(W, om, im, ranks)
    d = len(im)
    roots = [_sqrt_pair(partial_traces(sigma, im, k)[0]) for k in range(d)]
    X = W.to(F64).reshape(W.shape[0], *im)
    for k, (Lk, _) in enumerate(roots):
        X = torch.movedim(torch.tensordot(X, Lk, dims=([1 + k], [0])), -1, 1 + k)
    cores = tt_matrix_svd(X.reshape(W.shape), om, im, ranks)
    return [torch.einsum("atdb,de->ateb", G, Li) for G, (_, Li) in zip(cores, roots)]


# ----------------------------------------------------------------------------- the ALS sweep


class _Metric:
    """Sigma (or the identity) for the sweeps: the solve matrix in ``dtype`` and its Kronecker
    partial traces per split of the input modes, for the preconditioner."""

    def __init__(self, sigma, in_modes, dt):
        self.sigma = sigma
        self.S = None if sigma is None else sigma.to(dt)
        self.im = tuple(in_modes)
        self.dt = dt
        self._parts = {}

    def apply(self, Y):
        return Y if self.S is None else Y @ self.S

    def parts(self, k):
        """``(Sigma_<, Sigma_k, Sigma_>)`` partial traces (float64), ``None`` for the identity."""
        if self.sigma is None:
            return None
        if k not in self._parts:
            im = self.im
            Dl, dk, Dr = math.prod(im[:k]), im[k], math.prod(im[k + 1:])
            dims = (Dl, dk, Dr)
            self._parts[k] = tuple(
                partial_traces(self.sigma, (Dl, dk * Dr), 0)[0] if j == 0 else
                partial_traces(self.sigma, dims, 1)[0] if j == 1 else
                partial_traces(self.sigma, (Dl * dk, Dr), 1)[0] for j in range(3))
        return self._parts[k]


def _inverse(A):
    return spd_solve(A, torch.eye(A.shape[0], dtype=F64, device=A.device))


def _precond(metric, k, L, R, dt):
    """The Kronecker preconditioner of core ``k`` (module docstring)."""
    parts = metric.parts(k)
    if parts is None:
        Sl = torch.eye(L.shape[1], dtype=F64, device=L.device)
        Sk = None
        Sr = torch.eye(R.shape[2], dtype=F64, device=R.device)
    else:
        Sl, Sk, Sr = parts
    L64, R64 = L.to(F64), R.to(F64)
    A = torch.einsum("pqa,qr,prc->ac", L64, Sl, L64)
    B = torch.einsum("bmn,no,cmo->bc", R64, Sr, R64)
    Ai, Bi = _inverse(A).to(dt), _inverse(B).to(dt)
    Ki = _inverse(Sk).to(dt) if Sk is not None else None

    def apply(G):
        X = torch.tensordot(Ai, G, dims=([1], [0]))
        if Ki is not None:
            X = torch.tensordot(X, Ki, dims=([2], [0])).movedim(-1, 2)
        return torch.tensordot(X, Bi, dims=([3], [0]))

    return apply


def _sweep(cores, WS, metric, direction, dt, cg_tol, cg_max_iter, energy_tol):
    """One ALS sweep over all cores (float64 list, updated in place) for the TT-matrix fit of
    ``W`` with ``WS = W Sigma`` (``dtype``): ``direction`` ``+1`` left to right, ``-1`` right to
    left.  The gauge is brought to the starting core first."""
    d = len(cores)
    order = list(range(d)) if direction > 0 else list(range(d - 1, -1, -1))
    if direction > 0:
        for k in range(d - 1, 0, -1):
            _orth_right(cores, k)
    else:
        for k in range(d - 1):
            _orth_left(cores, k)
    for k in order:
        L, R = _interfaces([c.to(dt) for c in cores], k)
        shape = tuple(cores[k].shape)
        rhs = _adjoint(L, WS, R, shape)

        def op(G, L=L, R=R, shape=shape):
            return _adjoint(L, metric.apply(_build(L, G, R)), R, shape)

        G0 = cores[k].to(dt)
        pre = _precond(metric, k, L, R, dt)
        G, _ = pcg(op, rhs, G0, None, pre, cg_tol, cg_max_iter, energy_tol=energy_tol)
        if not bool(torch.isfinite(G).all()):
            raise diverged(None, "TT-ALS", f"non-finite core {k}")
        cores[k] = G.to(F64)
        if direction > 0 and k < d - 1:
            _orth_left(cores, k)
        elif direction < 0 and k > 0:
            _orth_right(cores, k)
    return cores


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TTMatrixResult(IterativeResult):
    """TT-matrix cores of ``W~ (T x D)``.

    Attributes:
        cores: ``[G_1, ..., G_d]``, ``G_k (r_{k-1}, t_k, d_k, r_k)``, ``r_0 = r_d = 1``.
        out_modes: ``(t_1, ..., t_d)``, product ``T``; in_modes: ``(d_1, ..., d_d)``, product
            ``D`` (column order of the weight as a matrix, ``F.unfold`` order for a conv).
        rel_error, history, raw_history, n_iter, converged, seconds, info: as in
            :class:`ddtd.solvers.CPResult` (relative squared Sigma error of the returned cores,
            its running best per iteration, each iterate's, ...).
    """

    cores: list = field(default_factory=list)
    out_modes: tuple = ()
    in_modes: tuple = ()

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(G.shape[3]) for G in self.cores[:-1])

    def matrix(self) -> torch.Tensor:
        """``W~ (T, D)``."""
        return tt_full(self.cores)


@dataclass(frozen=True)
class TTConvResult(IterativeResult):
    """TT convolution ``K~[t,s,y,x] = sum C[s,a] Y[a,y,b] X[b,x,c] T[c,t]``.

    Attributes:
        C: ``(S, R1)``; Y: ``(R1, kh, R2)``; X: ``(R2, kw, R3)``; T: ``(R3, T)`` (carries the
            scale).  Grouped layers: each with a leading group dim ``g`` (per-group ``S/g``,
            ``T/g``).
        kernel_size: ``(kh, kw)``.
        rel_error, history, raw_history, n_iter, converged, seconds, groups, info: as in
            :class:`TTMatrixResult`.
    """

    C: torch.Tensor = None
    Y: torch.Tensor = None
    X: torch.Tensor = None
    T: torch.Tensor = None
    kernel_size: tuple = (1, 1)

    @property
    def ranks(self) -> tuple[int, int, int]:
        return int(self.C.shape[-1]), int(self.Y.shape[-1]), int(self.X.shape[-1])

    def kernel(self) -> torch.Tensor:
        """``(T, S, kh, kw)`` (grouped: ``(g, T/g, S/g, kh, kw)``)."""
        if self.groups == 1:
            return torch.einsum("sa,ayb,bxc,ct->tsyx", self.C, self.Y, self.X, self.T)
        return torch.einsum("gsa,gayb,gbxc,gct->gtsyx", self.C, self.Y, self.X, self.T)


# ----------------------------------------------------------------------------- solvers


def _cg_tol(cg_tol, dt):
    return cg_tol if cg_tol is not None else (1e-10 if dt == F64 else 1e-6)


def _tt_matrix_one(W, sigma, om, im, rs, max_iter, tol, damping, eps_rel, cg_tol, cg_max_iter,
                   cg_energy_tol, init, dev, dt, name):
    T, D = W.shape
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    t0 = time.perf_counter()
    if isinstance(init, str):
        cores = _whitened_init(W, s_obj if init == "whitened" else None, om, im, rs)
    else:                                                      # warm start: the given cores
        cores = [G.to(device=dev, dtype=F64) for G in init]
    metric = _Metric(s_solve, im, dt)
    WS = (W @ s_solve if s_solve is not None else W).to(dt)
    base = sigma_error(W, s_obj, F64)
    track = BestIterate(tol, max_iter, name, "TT-ALS" + ("-Sigma" if sigma is not None else ""))
    err = None
    it = 0
    for it in range(1, max_iter + 1):
        if it > 1:
            _sweep(cores, WS, metric, 1 if it % 2 == 0 else -1, dt, _cg_tol(cg_tol, dt), cg_max_iter,
                   cg_energy_tol * err)
        rc = [rounded(G, dt) for G in cores]
        err = sigma_error(W - tt_full(rc), s_obj, F64)
        if track.step(err / base if base > 0 else 0.0, it, lambda rc=rc: rc):
            break
    return track.best, track, it, base, time.perf_counter() - t0


def _check_matrix_init(init, om, im, rs, name):
    """``init`` is ``'whitened'``, ``'tt-svd'`` or finite cores of the shapes ``om``, ``im``,
    ``rs`` give."""
    if isinstance(init, str):
        if init not in ("whitened", "tt-svd"):
            raise InputError(f"unknown TT init {init!r}", hint="use 'whitened', 'tt-svd' or a list of cores")
        return
    b = (1,) + tuple(rs) + (1,)
    want = [(b[k], t, d, b[k + 1]) for k, (t, d) in enumerate(zip(om, im))]
    have = [tuple(G.shape) if isinstance(G, torch.Tensor) else None for G in init]
    if have != want:
        raise InputError(f"{layer_label(name)}: TT init cores of shapes {have} for modes {om} x {im} and "
                         f"ranks {tuple(rs)}", hint=f"give cores of shapes {want}")
    for k, G in enumerate(init):
        check_finite(G, f"init core {k}", name)


def _matrix_weight(weight, name):
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[0], -1)
    if weight.dim() != 2:
        raise InputError(f"{layer_label(name)}: a TT-matrix needs a (T, D) weight or a 1x1 conv "
                         f"kernel, got {tuple(weight.shape)}", hint="use tt_conv for k x k kernels")
    return weight


def tt_matrix(weight: torch.Tensor, sigma: torch.Tensor | None, ranks, *, out_modes=None,
              in_modes=None, cores: int = DEFAULT_TT_CORES, max_iter: int = 20, tol: float = 1e-5,
              init: str | list = "whitened", damping: float = default_damping("tt"),
              eps_rel: float = EPS_REL, cg_tol: float | None = None, cg_max_iter: int = 10,
              cg_energy_tol: float = 1e-5, device=None, dtype: torch.dtype | None = None,
              name: str | None = None) -> TTMatrixResult:
    """TT-matrix of a Linear weight (or a 1x1 conv kernel) fitted in the Sigma metric.

    Args:
        weight: ``(T, D)`` or ``(T, D, 1, 1)``.
        sigma: ``(D, D)`` input covariance, or ``None`` (Frobenius: TT-SVD, then ALS sweeps).
        ranks: one int for every bond or ``cores - 1`` ints; clipped to :func:`tt_max_ranks`.
        out_modes, in_modes: the mode factorisations (products ``T`` and ``D``); default
            :func:`balanced_factors` into ``cores`` modes.
        max_iter: iterations (the first is the start, each further one an ALS sweep, alternating
            direction); tol: stop on a relative decrease of the error below ``tol``.
        init: ``'whitened'`` (TT-SVD of the Kronecker-whitened weight, module docstring),
            ``'tt-svd'`` (of the weight itself), or a list of cores to start from (a warm start:
            shapes ``(r_{k-1}, t_k, d_k, r_k)`` for the modes and clipped ranks of this call;
            the first iterate is these cores, so the result is never worse than them).
        damping, eps_rel: as in :func:`ddtd.solvers.cp_als` (default
            :func:`ddtd.solvers.default_damping`).
        cg_tol, cg_max_iter, cg_energy_tol: CG rule per core update (relative residual, step
            cap, stop when a step lowers the error by less than ``cg_energy_tol`` times it).
        device, dtype: compute device; dtype of the returned cores and of the CG products
            (float32 default); every reported error is float64.

    Returns:
        :class:`TTMatrixResult`.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    W = _matrix_weight(weight, name)
    if sigma is not None and sigma.dim() == 3:
        if sigma.shape[0] != 1:
            raise InputError(f"{layer_label(name)}: a TT-matrix does not split groups",
                             hint="leave grouped 1x1 convs to svd")
        sigma = sigma[0]
    check_finite(W, "weight", name)
    T, D = W.shape
    om, im = tt_matrix_modes(T, D, cores, out_modes, in_modes)
    rs = tt_matrix_ranks(ranks, om, im)
    _check_matrix_init(init, om, im, rs, name)
    W64 = W.to(device=dev, dtype=F64)
    best, track, it, base, secs = _tt_matrix_one(W64, sigma, om, im, rs, max_iter, tol, damping, eps_rel,
                                                 cg_tol, cg_max_iter, cg_energy_tol, init, dev, dt, name)
    d = damping if sigma is not None else 0.0
    return TTMatrixResult(cores=[G.to(dt) for G in best], out_modes=om, in_modes=im,
                          rel_error=track.history[-1], history=track.history, raw_history=track.raw,
                          n_iter=it, converged=track.converged, seconds=secs,
                          info={"damping": float(d), **fit_diagnostics(W64, tt_full(best))})


def _tt_conv_one(weight, sigma, rs, max_iter, tol, damping, eps_rel, cg_tol, cg_max_iter,
                 cg_energy_tol, init, dev, dt, name):
    T, S, kh, kw = weight.shape
    D = S * kh * kw
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    t0 = time.perf_counter()
    om, im = (1, 1, 1, T), (S, kh, kw, 1)
    cores = _whitened_init(W, s_obj if init == "whitened" else None, om, im, rs)
    ins = [cores[0], cores[1], cores[2]]                      # (1,1,S,R1), (R1,1,kh,R2), (R2,1,kw,R3)
    metric = _Metric(s_solve, im[:3], dt)
    floor = 0.0 if s_obj is None else float((torch.diagonal(s_solve) - torch.diagonal(s_obj)).mean())
    WS = W if s_solve is None else W @ s_solve                 # (T, D) float64, solve Sigma
    base = sigma_error(W, s_obj, F64)
    track = BestIterate(tol, max_iter, name, "TT-ALS" + ("-Sigma" if sigma is not None else ""))
    err = None
    it = 0
    for it in range(1, max_iter + 1):
        if it > 1:                                             # input cores for Q^T W, R in X
            Q, Rm = qr(A)
            ins[2] = torch.tensordot(ins[2], Rm.T, dims=([3], [0]))      # (R2, 1, kw, R3)
            sub = [ins[0], ins[1], ins[2].permute(0, 3, 2, 1)]           # X as (R2, R3, kw, 1)
            _sweep(sub, (Q.T @ WS).to(dt), metric, 1 if it % 2 == 0 else -1, dt, _cg_tol(cg_tol, dt),
                   cg_max_iter, cg_energy_tol * err)
            ins = [sub[0], sub[1], sub[2].permute(0, 3, 2, 1)]
        # closed-form output core for the rounded input cores
        ins = [rounded(G, dt) for G in ins]
        M = _input_matrix(ins)                                                     # (D, R3)
        SM = M if s_solve is None else s_solve @ M
        MSM = M.T @ SM
        WSM = WS @ M
        A = spd_solve(0.5 * (MSM + MSM.T), WSM, right=True)                          # (T, R3)
        if not bool(torch.isfinite(A).all()):
            raise diverged(name, "TT-ALS", f"non-finite output core at iteration {it}")
        Ar = rounded(A, dt)
        MSMo = MSM - floor * (M.T @ M)
        WSMo = WSM - floor * (W @ M)

        def residual(Ar=Ar, M=M):
            return sigma_error(W - Ar @ M.T, s_obj, F64)

        err = error_from_terms(base, float((Ar * WSMo).sum()), float(((Ar.T @ Ar) * MSMo).sum()), residual)
        if track.step(err / base if base > 0 else 0.0, it, lambda Ar=Ar, ins=list(ins): (ins, Ar)):
            break
        A = Ar
    (ins, Ar) = track.best
    C = ins[0].reshape(S, -1)
    Y = ins[1][:, 0]
    X = ins[2][:, 0]
    res = dict(C=C.to(dt), Y=Y.to(dt), X=X.to(dt), T=Ar.T.contiguous().to(dt), kernel_size=(kh, kw),
               rel_error=track.history[-1], history=track.history, raw_history=track.raw, n_iter=it,
               converged=track.converged, seconds=time.perf_counter() - t0)
    return res, base


def _input_matrix(ins):
    """``M (D, R3)`` of the input cores ``(1,1,S,R1), (R1,1,kh,R2), (R2,1,kw,R3)``."""
    C, Y, X = ins
    return torch.einsum("sa,ayb,bxc->syxc", C[0, 0], Y[:, 0], X[:, 0]).reshape(-1, X.shape[3])


def tt_conv(weight: torch.Tensor, sigma: torch.Tensor | None, ranks, *, max_iter: int = 20,
            tol: float = 1e-5, init: str = "whitened", damping: float = default_damping("tt"),
            eps_rel: float = EPS_REL, cg_tol: float | None = None, cg_max_iter: int = 10,
            cg_energy_tol: float = 1e-5, groups: int | None = None, device=None,
            dtype: torch.dtype | None = None, name: str | None = None) -> TTConvResult:
    """TT convolution of a conv kernel fitted in the Sigma metric (module docstring).

    Args:
        weight: ``(T, S, kh, kw)`` kernel (grouped: ``(T, S/g, kh, kw)``).
        sigma: ``(D, D)`` input covariance (``(g, D_g, D_g)`` grouped) or ``None`` (Frobenius:
            TT-SVD, then ALS).
        ranks: ``(R1, R2, R3)`` or one int for all three (per group), clipped to
            :func:`tt_conv_ranks`.
        max_iter, tol, init, damping, eps_rel, cg_tol, cg_max_iter, cg_energy_tol, device,
            dtype, name: as in :func:`tt_matrix`; groups: as in :func:`ddtd.solvers.tucker2`.

    Returns:
        :class:`TTConvResult`.
    """
    if weight.dim() != 4:
        raise InputError(f"{layer_label(name)}: a TT convolution needs a conv kernel (T, S, kh, kw), "
                         f"got {tuple(weight.shape)}", hint="use tt_matrix for Linear layers")
    if init not in ("whitened", "tt-svd"):
        raise InputError(f"unknown TT init {init!r}", hint="use 'whitened' or 'tt-svd'")
    dev, dt = resolve_device_dtype(weight, device, dtype)
    gs = split_groups(weight, sigma, groups, name)
    T, S, kh, kw = gs.weights[0].shape
    rs = tt_conv_ranks(ranks, T, S, kh, kw)
    outs = [_tt_conv_one(w, s, rs, max_iter, tol, damping, eps_rel, cg_tol, cg_max_iter, cg_energy_tol,
                         init, dev, dt, name) for w, s in zip(gs.weights, gs.sigmas)]
    d = damping if sigma is not None else 0.0
    if gs.groups == 1:
        r = TTConvResult(**outs[0][0], groups=1)
    else:
        rs_, bases = [o[0] for o in outs], [o[1] for o in outs]
        r = TTConvResult(
            **{k: torch.stack([x[k] for x in rs_]) for k in ("C", "Y", "X", "T")},
            kernel_size=(kh, kw),
            rel_error=combine_histories([[x["rel_error"]] for x in rs_], bases)[0],
            history=combine_histories([x["history"] for x in rs_], bases),
            raw_history=combine_histories([x["raw_history"] for x in rs_], bases),
            n_iter=max(x["n_iter"] for x in rs_), converged=all(x["converged"] for x in rs_),
            seconds=sum(x["seconds"] for x in rs_), groups=gs.groups)
    K64 = TTConvResult(C=r.C.to(F64), Y=r.Y.to(F64), X=r.X.to(F64), T=r.T.to(F64), kernel_size=(kh, kw),
                       rel_error=r.rel_error, groups=r.groups).kernel()
    return dataclasses.replace(r, info={"damping": float(d), **fit_diagnostics(weight, K64)})
