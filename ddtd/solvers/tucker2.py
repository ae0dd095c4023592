"""Tucker2 of a conv kernel, in the Sigma metric (ALS + CG) or the Frobenius norm (HOOI).

Model: ``K~ = G x1 U x2 V``, i.e. ``K~[t,s,i,j] = sum_{a,b} U[t,a] G[a,b,i,j] V[s,b]`` with
``U (T x R1)``, ``V (S x R2)``, core ``G (R1, R2, kh, kw)``.  Layers: 1x1 conv ``S -> R2``
(weights ``V^T``), ``kh x kw`` conv ``R2 -> R1`` (core; original stride / padding / dilation),
1x1 conv ``R1 -> T`` (weights ``U``, bias).

Sigma-ALS (``P = kh*kw``, ``Q = V kron I_P`` of size ``D x R2 P`` so that ``W~ = U G_(1) Q^T``):

1. For fixed ``V`` (closed form): ``C* = W Sigma Q (Q^T Sigma Q)^{-1}``; ``U`` = top-``R1``
   eigenvectors of ``C* (Q^T Sigma Q) C*^T``; ``G_(1) = U^T C*``.  The error is
   ``trace(W Sigma W^T) - (sum of those top-R1 eigenvalues)``.
2. For fixed ``U, G`` the objective is ``||(U^T W - G_(1) Q^T) L||^2 + const`` (``U`` has
   orthonormal columns), quadratic in ``V`` with normal equations
   ``H(V) = sum_p [Sigma Q(V) G^T G]_{(s,p),(b,p)} = sum_p [Sigma W^T U G_(1)]_{(s,p),(b,p)}``,
   solved matrix-free by preconditioned CG warm-started at the current ``V``.  Preconditioner:
   the exact inverse of the operator when ``Sigma`` is replaced by its Kronecker approximation
   ``Sigma_S (x) Sigma_P`` (partial traces), i.e. ``X -> Sigma_S^{-1} X Z^{-1}``.
   ``V`` is then orthonormalised (step 1 only depends on ``span(V)``).

Each step is a minimisation, so the error history is non-increasing; the best iterate is kept.
With ``sigma=None`` the solver is HOOI (higher-order orthogonal iteration) on modes 1 and 2.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError

from ._common import (BestIterate, eigh, qr, EPS_REL, F64, _where, check_finite, combine_histories, diverged, frob_sq,
                      partial_traces, pcg, prepare_sigma, resolve_device_dtype, sigma_error,
                      spd_solve, split_groups, top_eigvecs)


@dataclass(frozen=True)
class Tucker2Result:
    """Tucker2 factors ``K~ = core x1 U x2 V``.

    Attributes:
        U: ``(T, R1)`` output factor (orthonormal columns); grouped: ``(g, T/g, R1)``.
        core: ``(R1, R2, kh, kw)``; grouped: ``(g, R1, R2, kh, kw)``.
        V: ``(S, R2)`` input factor (orthonormal columns); grouped: ``(g, S/g, R2)``.
        rel_error: final relative squared Sigma error, recomputed from the explicit residual.
        history: best-so-far relative squared Sigma error after each iteration (non-increasing).
        raw_history: the error of each iterate (non-increasing up to rounding).
        n_iter: iterations run; converged: relative decrease fell below ``tol``.
        seconds: wall time.
        groups: number of groups.
    """

    U: torch.Tensor
    core: torch.Tensor
    V: torch.Tensor
    rel_error: float
    history: list = field(default_factory=list)
    raw_history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    seconds: float = 0.0
    groups: int = 1

    def kernel(self) -> torch.Tensor:
        """The approximated kernel ``(T, S, kh, kw)`` (grouped: ``(g, T/g, S/g, kh, kw)``)."""
        if self.groups == 1:
            return torch.einsum("ta,abij,sb->tsij", self.U, self.core, self.V)
        return torch.einsum("gta,gabij,gsb->gtsij", self.U, self.core, self.V)


def _hosvd_V(W3: torch.Tensor, R2: int) -> torch.Tensor:
    S = W3.shape[1]
    M = W3.permute(1, 0, 2).reshape(S, -1).to(F64)
    return top_eigvecs(M @ M.T, R2)[1]


def _init_V(W3, Sg, init, R2, seed, dev):
    T, S, P = W3.shape
    if isinstance(init, torch.Tensor):
        if init.shape != (S, R2):
            raise InputError(f"init V has shape {tuple(init.shape)}, expected ({S}, {R2})",
                             hint="pass V of shape (S, R2)")
        return qr(init.to(device=dev, dtype=F64))[0]
    if init == "random":
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        V = torch.randn(S, R2, generator=g, dtype=F64).to(dev)
        return qr(V)[0]
    if init == "hosvd" or (init == "whitened" and Sg is None):
        return _hosvd_V(W3, R2)
    if init == "whitened":
        # HOSVD of the kernel whitened with the Kronecker approximation Sigma ~ Ss (x) Sp.
        Ss, Sp = partial_traces(Sg, (S, P), 0)

        def sqrt_psd(A):
            w, Q = eigh(0.5 * (A + A.T))
            w = w.clamp_min(w.max() * 1e-12)
            return (Q * w.sqrt()) @ Q.T, (Q / w.sqrt()) @ Q.T

        Ls, Ls_inv = sqrt_psd(Ss)
        Lp, _ = sqrt_psd(Sp)
        Kw = torch.einsum("tsp,su,pq->tuq", W3.to(F64), Ls, Lp)
        Vw = _hosvd_V(Kw, R2)
        return qr(Ls_inv @ Vw)[0]
    raise InputError(f"unknown init {init!r}", hint="use 'hosvd', 'whitened', 'random' or a tensor V")


def _hooi(W3, R1, R2, V, max_iter, tol, name, t0):
    T, S, P = W3.shape
    Wtps = W3.permute(0, 2, 1).contiguous()  # (T, P, S)
    base = frob_sq(W3)
    track = BestIterate(tol, max_iter, name, "Tucker2 HOOI")
    it = 0
    for it in range(1, max_iter + 1):
        Vd = V.to(W3.dtype)
        Y = (Wtps.reshape(T * P, S) @ Vd).reshape(T, P * R2).to(F64)
        U = top_eigvecs(Y @ Y.T, R1)[1]
        Z = (U.to(W3.dtype).T @ W3.reshape(T, S * P)).reshape(R1, S, P)
        Zs = Z.permute(1, 0, 2).reshape(S, R1 * P).to(F64)
        V = top_eigvecs(Zs @ Zs.T, R2)[1]
        core = torch.einsum("asp,sb->abp", Z.to(F64), V)
        err = max(base - frob_sq(core), 0.0)
        if track.step(err / base, it, lambda: (U, core, V)):
            break
    U, core, V = track.best
    return U, core, V, track.history, track.raw, it, track.converged


def _als_sigma(W, Sg, S, P, R1, R2, V, max_iter, tol, cg_tol, cg_max_iter, cg_energy_tol, dt,
               name):
    T, D = W.shape
    Sd = Sg.to(dt)
    Wd = W.to(dt)
    WS = Wd @ Sd                                           # (T, D)
    WSt = WS.T.contiguous()                                # (D, T)
    base = float((WS.to(F64) * W.to(F64)).sum())
    Sp_ = Sd.reshape(D, S, P).permute(0, 2, 1).contiguous().reshape(D * P, S)  # Sigma, cols (q, s)
    Ss, Sp = partial_traces(Sg, (S, P), 0)
    Ss_inv = spd_solve(Ss, torch.eye(S, dtype=F64, device=W.device)).to(dt)

    def sigQ(Vd):        # Sigma Q(V): (D, R2*P), columns (b, q)
        return (Sp_ @ Vd).reshape(D, P, R2).permute(0, 2, 1).reshape(D, R2 * P)

    def Qt(X):           # Q^T X for X (D, m): (R2*P, m)
        m = X.shape[1]
        Y = Vd.T @ X.reshape(S, P * m)
        return Y.reshape(R2 * P, m)

    def contract(Y, GtGp):  # Y (D, R2P) -> sum_p [Y GtG]_{(s,p),(b,p)}: (S, R2)
        Yp = Y.reshape(S, P, R2 * P).permute(1, 0, 2)       # (P, S, R2P)
        return torch.bmm(Yp, GtGp).sum(0)

    track = BestIterate(tol, max_iter, name, "Tucker2-ALS-Sigma")
    it = 0
    for it in range(1, max_iter + 1):
        Vd = V.to(dt)
        SQ = sigQ(Vd)
        QSQ = Qt(SQ).to(F64)
        WSQ = Qt(WSt).T.to(F64)                            # (T, R2P)
        Cs = spd_solve(QSQ, WSQ, right=True)               # C* (T, R2P)
        Xs = WSQ @ Cs.T
        w, U = top_eigvecs(Xs, R1)
        G1 = U.T @ Cs                                      # (R1, R2P)
        err = max(base - float(w.sum()), 0.0)
        if not bool(torch.isfinite(G1).all()):
            raise diverged(name, "Tucker2-ALS-Sigma", f"non-finite core at iteration {it}")
        if track.step(err / base, it, lambda: (U, G1, V)):
            break
        # ---- V step: CG on the coupled normal equations, warm-started ----
        GtG = G1.T @ G1                                    # (R2P, R2P), index (b, q)
        GtGp = GtG.reshape(R2 * P, R2, P).permute(2, 0, 1).contiguous().to(dt)   # (P, R2P, R2)
        Ud, G1d = U.to(dt), G1.to(dt)
        rhsQ = (WSt @ Ud) @ G1d                            # (D, R2P)
        rhs = torch.diagonal(rhsQ.reshape(S, P, R2, P), dim1=1, dim2=3).sum(-1)
        r0 = rhs - contract(SQ, GtGp)
        Z = torch.einsum("aqbp,pq->ab", GtG.reshape(R2, P, R2, P), Sp)
        Z_inv = spd_solve(Z, torch.eye(R2, dtype=F64, device=W.device)).to(dt)

        def op(X):
            return contract(sigQ(X), GtGp)

        Vn, _ = pcg(op, rhs, Vd, r0, lambda R: Ss_inv @ R @ Z_inv, cg_tol, cg_max_iter,
                    energy_tol=cg_energy_tol * err)
        if not bool(torch.isfinite(Vn).all()):
            raise diverged(name, "Tucker2-ALS-Sigma", f"CG produced NaN at iteration {it}")
        V = qr(Vn.to(F64))[0]
    U, G1, V = track.best
    return U, G1.reshape(R1, R2, P), V, track.history, track.raw, it, track.converged


def _tucker2_one(weight, sigma, ranks, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
                 cg_max_iter, cg_energy_tol, dev, dt, name):
    if weight.dim() != 4:
        raise InputError(f"{_where(name)}: Tucker2 needs a conv kernel (T, S, kh, kw), got "
                         f"{tuple(weight.shape)}", hint="use sigma_svd for Linear layers")
    T, S, kh, kw = weight.shape
    P, D = kh * kw, S * kh * kw
    R1, R2 = (int(ranks), int(ranks)) if isinstance(ranks, int) else (int(ranks[0]), int(ranks[1]))
    if not (1 <= R1 <= T and 1 <= R2 <= S):
        raise InputError(f"{_where(name)}: Tucker2 ranks ({R1}, {R2}) invalid for T={T}, S={S}",
                         hint="need 1 <= R1 <= T and 1 <= R2 <= S")
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    W3 = W.reshape(T, S, P)
    V0 = _init_V(W3, s_solve, init, R2, seed, dev)
    t0 = time.perf_counter()
    if s_obj is None:
        U, core, V, hist, raw, it, conv = _hooi(W3.to(dt), R1, R2, V0, max_iter, tol, name, t0)
    else:
        ct = cg_tol if cg_tol is not None else (1e-10 if dt == F64 else 1e-6)
        U, core, V, hist, raw, it, conv = _als_sigma(W, s_solve, S, P, R1, R2, V0, max_iter, tol,
                                                     ct, cg_max_iter, cg_energy_tol, dt, name)
    What = torch.einsum("ta,abp,sb->tsp", U, core.to(F64), V).reshape(T, D)
    base = sigma_error(W, s_obj, F64 if s_obj is None else dt)
    err = sigma_error(W - What, s_obj, F64 if s_obj is None else dt)
    rel = err / base if base > 0 else 0.0
    if not math.isfinite(rel):
        raise diverged(name, "Tucker2", "non-finite final error")
    res = dict(U=U.to(dt), core=core.reshape(R1, R2, kh, kw).to(dt), V=V.to(dt), rel_error=rel,
               history=hist, raw_history=raw, n_iter=it, converged=conv,
               seconds=time.perf_counter() - t0)
    return res, base


def tucker2(weight: torch.Tensor, sigma: torch.Tensor | None, ranks, *, max_iter: int = 50,
            tol: float = 1e-5, seed: int = 0, init="whitened", damping: float = 0.0,
            eps_rel: float = EPS_REL, cg_tol: float | None = None, cg_max_iter: int = 5,
            cg_energy_tol: float = 1e-5,
            groups: int | None = None, device=None, dtype: torch.dtype | None = None,
            name: str | None = None) -> Tucker2Result:
    """Tucker2 decomposition of a conv kernel fitted in the Sigma metric.

    Args:
        weight: ``(T, S, kh, kw)`` kernel (grouped: ``(T, S/g, kh, kw)``).
        sigma: ``(D, D)`` input covariance (``(g, D_g, D_g)`` grouped) or ``None`` (Frobenius:
            HOOI).
        ranks: ``(R1, R2)`` (output, input) ranks, or one int for both; per group.
        max_iter: maximum ALS / HOOI iterations.
        tol: stop when the relative decrease of the error in one iteration is below ``tol``.
        seed: for ``init='random'``.
        init: ``'whitened'`` (HOSVD of the kernel whitened with the Kronecker approximation of
            Sigma; = ``'hosvd'`` for Frobenius), ``'hosvd'`` (plain kernel), ``'random'``, or an
            ``(S, R2)`` tensor.
        damping: Sigma += damping * mean(diag) * I (changes the objective).
        eps_rel: solver floor on Sigma, see :func:`ddtd.solvers._common.prepare_sigma`.
        cg_tol, cg_max_iter, cg_energy_tol: CG rule for the V step: stop at relative residual
            ``cg_tol`` (default 1e-6 float32, 1e-10 float64), or when a step lowers the Sigma
            error by less than ``cg_energy_tol`` times its current value (0 disables), or after
            ``cg_max_iter`` steps.  CG never increases the error.  Default: 5 warm-started steps
            per V update (measured on an activation covariance, (256,256,3,3) at (64, 64), 25
            iterations: the same final error as 50 steps to 4 digits, 26% less time).
        groups: number of groups (inferred from a 3-D sigma).
        device, dtype: compute device; dtype of the large products and of the returned factors
            (float32 default; small solves are always float64).
        name: layer name for error messages.

    Returns:
        :class:`Tucker2Result`.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    gs = split_groups(weight, sigma, groups, name)
    outs = [_tucker2_one(w, s, ranks, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
                         cg_max_iter, cg_energy_tol, dev, dt, name) for w, s in zip(gs.weights, gs.sigmas)]
    if gs.groups == 1:
        return Tucker2Result(**outs[0][0], groups=1)
    rs, bases = [o[0] for o in outs], [o[1] for o in outs]
    return Tucker2Result(
        U=torch.stack([r["U"] for r in rs]), core=torch.stack([r["core"] for r in rs]),
        V=torch.stack([r["V"] for r in rs]),
        rel_error=combine_histories([[r["rel_error"]] for r in rs], bases)[0],
        history=combine_histories([r["history"] for r in rs], bases),
        raw_history=combine_histories([r["raw_history"] for r in rs], bases),
        n_iter=max(r["n_iter"] for r in rs), converged=all(r["converged"] for r in rs),
        seconds=sum(r["seconds"] for r in rs), groups=gs.groups)
