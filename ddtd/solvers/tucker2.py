"""Tucker2 of a conv kernel, in the Sigma metric (ALS + CG) or the Frobenius norm (HOOI).

Model: ``K~ = G x1 U x2 V``, i.e. ``K~[t,s,i,j] = sum_{a,b} U[t,a] G[a,b,i,j] V[s,b]`` with
``U (T x R1)``, ``V (S x R2)``, core ``G (R1, R2, kh, kw)``.  Layers: 1x1 conv ``S -> R2``
(weights ``V^T``), ``kh x kw`` conv ``R2 -> R1`` (core; original stride / padding / dilation),
1x1 conv ``R1 -> T`` (weights ``U``, bias).

Sigma-ALS (``P = kh*kw``, ``Q = V kron I_P`` of size ``D x R2 P`` so that ``W~ = U G_(1) Q^T``):

1. For fixed ``V`` (closed form): ``C* = W Sigma Q (Q^T Sigma Q)^{-1}``; ``U`` = top-``R1``
   eigenvectors of ``C* (Q^T Sigma Q) C*^T``; ``G_(1) = U^T C*`` (float64, ``Sigma Q`` included).
   ``U, G`` are rounded to ``dtype`` and the error of the rounded ``(U, G, V)`` is
   ``trace(W S W^T) - 2 <U G, W S Q> + <G (Q^T S Q) G^T, U^T U>`` in float64 (``S`` the
   objective Sigma).
2. For fixed ``U, G`` the objective is ``||(U^T W - G_(1) Q^T) L||^2 + const`` (``U`` has
   orthonormal columns), quadratic in ``V`` with normal equations
   ``H(V) = sum_p [Sigma Q(V) G^T G]_{(s,p),(b,p)} = sum_p [Sigma W^T U G_(1)]_{(s,p),(b,p)}``,
   solved matrix-free by preconditioned CG warm-started at the current ``V``.  Preconditioner:
   the exact inverse of the operator when ``Sigma`` is replaced by its Kronecker approximation
   ``Sigma_S (x) Sigma_P`` (partial traces), i.e. ``X -> Sigma_S^{-1} X Z^{-1}``.
   ``V`` is then orthonormalised (step 1 only depends on ``span(V)``).

Each step is a minimisation (the V step up to the accuracy of CG in ``dtype``); the best
iterate in the exact error is returned, and the history is the running best of that error.
With ``sigma=None`` the solver is HOOI (higher-order orthogonal iteration) on modes 1 and 2,
each iterate's error from its explicit residual.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, layer_label

from ._common import (IterativeResult, BestIterate, eigh, qr, EPS_REL, F64, check_finite, combine_histories,
                      default_damping, diverged, error_from_terms, fit_diagnostics, frob_sq,
                      partial_traces, pcg, prepare_sigma, resolve_device_dtype, rounded,
                      spd_solve, split_groups, top_eigvecs)


@dataclass(frozen=True)
class Tucker2Result(IterativeResult):
    """Tucker2 factors ``K~ = core x1 U x2 V``.

    Attributes:
        U: ``(T, R1)`` output factor (orthonormal columns up to the rounding to ``dtype``);
            grouped: ``(g, T/g, R1)``.
        core: ``(R1, R2, kh, kw)``; grouped: ``(g, R1, R2, kh, kw)``.
        V: ``(S, R2)`` input factor (orthonormal columns up to rounding); grouped:
            ``(g, S/g, R2)``.
        rel_error: relative squared error ``trace(dW S dW^T) / trace(W S W^T)`` of the returned
            factors (``S`` = the damped Sigma, the identity for Frobenius) = ``history[-1]``.
        history: the best relative error among the iterates so far, after each iteration
            (non-increasing); every entry is the exact error of an iterate rounded to ``dtype``
            (float64 arithmetic), and the returned factors are the iterate of the last entry.
        raw_history: the error of each iterate, same measure (float32 CG steps may raise it).
        n_iter: iterations run; converged: relative decrease fell below ``tol``.
        seconds: wall time.
        groups: number of groups.
        info: ``damping``, ``norm_ratio``, ``identity_error`` (:func:`ddtd.solvers.fit_diagnostics`).
    """

    U: torch.Tensor
    core: torch.Tensor
    V: torch.Tensor

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


def _hooi(W3, R1, R2, V, max_iter, tol, dt, name):
    """HOOI on modes 1 and 2 of ``W3 (T, S, P)`` (float64).  Each iterate is rounded to ``dt``
    and its error taken from the explicit residual (float64)."""
    T, S, P = W3.shape
    Wd = W3.to(dt)
    Wtps = Wd.permute(0, 2, 1).contiguous()  # (T, P, S)
    base = frob_sq(W3)
    track = BestIterate(tol, max_iter, name, "Tucker2 HOOI")
    it = 0
    for it in range(1, max_iter + 1):
        Vd = V.to(dt)
        Y = (Wtps.reshape(T * P, S) @ Vd).reshape(T, P * R2).to(F64)
        U = top_eigvecs(Y @ Y.T, R1)[1]
        Z = (U.to(dt).T @ Wd.reshape(T, S * P)).reshape(R1, S, P)
        Zs = Z.permute(1, 0, 2).reshape(S, R1 * P).to(F64)
        V = top_eigvecs(Zs @ Zs.T, R2)[1]
        Ur, Vr = rounded(U, dt), rounded(V, dt)
        core = rounded(torch.einsum("asp,sb->abp", Z.to(F64), V), dt)
        What = torch.einsum("ta,abp,sb->tsp", Ur, core, Vr)
        err = frob_sq(W3 - What)
        if track.step(err / base, it, lambda: (Ur, core, Vr)):
            break
    U, core, V = track.best
    return U, core, V, track.history, track.raw, it, track.converged


def _als_sigma(W, Sg, floor, S, P, R1, R2, V, max_iter, tol, cg_tol, cg_max_iter, cg_energy_tol,
               dt, name):
    """Sigma-ALS (module docstring) on ``W (T, D)`` float64.  ``Sg`` (float64) is the solve Sigma
    (:func:`prepare_sigma`'s ``sigma_solve``), the objective is ``Sg - floor * I``.

    Each iteration: ``Sg Q(V)`` in float64 for the rounded ``V``, the closed-form ``U, G`` step
    in float64, both rounded to ``dt``; the exact objective error of the rounded ``(U, G, V)``
    from float64 terms (:func:`error_from_terms`; the floor is removed on the small matrices);
    then the ``V`` step by CG in ``dt``.
    """
    T, D = W.shape
    eyeP = torch.eye(P, dtype=F64, device=W.device)
    WSt = (W @ Sg).T.contiguous()                          # (D, T) float64
    base = float((WSt.T * W).sum()) - floor * frob_sq(W)   # objective
    WStd = WSt.to(dt)
    Sd = Sg.to(dt)
    Ss, Sp = partial_traces(Sg, (S, P), 0)
    Ss_inv = spd_solve(Ss, torch.eye(S, dtype=F64, device=W.device)).to(dt)

    def sigQ(Vx, Sm):    # Sigma Q(V): (D, R2*P), columns (b, q); Q^T Sigma via Sigma's (s, (q, d)) rows
        return (Vx.T @ Sm.reshape(S, P * D)).reshape(R2 * P, D).T

    def Qt(X, Vx):       # Q^T X for X (D, m): (R2*P, m)
        m = X.shape[1]
        return (Vx.T @ X.reshape(S, P * m)).reshape(R2 * P, m)

    def Qmat(Vx):        # Q(V) = V kron I_P: (D, R2*P)
        return torch.einsum("sb,pq->spbq", Vx, eyeP).reshape(D, R2 * P)

    def contract(Y, GtGp):  # Y (D, R2P) -> sum_p [Y GtG]_{(s,p),(b,p)}: (S, R2)
        Yp = Y.reshape(S, P, R2 * P).permute(1, 0, 2)       # (P, S, R2P)
        return torch.bmm(Yp, GtGp).sum(0)

    track = BestIterate(tol, max_iter, name, "Tucker2-ALS-Sigma")
    it = 0
    for it in range(1, max_iter + 1):
        Vd = V.to(dt)
        Vr = Vd.to(F64)
        SQ = sigQ(Vr, Sg)                                  # float64
        QSQ = Qt(SQ, Vr)
        QSQ = 0.5 * (QSQ + QSQ.T)
        WSQ = Qt(WSt, Vr).T                                # (T, R2P)
        Cs = spd_solve(QSQ, WSQ, right=True)               # C* (T, R2P)
        _, U = top_eigvecs(WSQ @ Cs.T, R1)
        G1 = U.T @ Cs                                      # (R1, R2P)
        if not bool(torch.isfinite(G1).all()):
            raise diverged(name, "Tucker2-ALS-Sigma", f"non-finite core at iteration {it}")
        Ur, Gr = rounded(U, dt), rounded(G1, dt)
        UG = Ur @ Gr
        # objective terms: remove the floor (Q^T Q = V^T V kron I, W Q) from the solve terms
        QSQo = QSQ - floor * torch.kron(Vr.T @ Vr, eyeP)
        WSQo = WSQ - floor * Qt(W.T, Vr).T

        def residual(UG=UG, Vr=Vr):
            E = W - UG @ Qmat(Vr).T
            return float(((E @ Sg) * E).sum()) - floor * frob_sq(E)

        err = error_from_terms(base, float((UG * WSQo).sum()),
                               float(((Gr @ QSQo @ Gr.T) * (Ur.T @ Ur)).sum()), residual)
        if track.step(err / base, it, lambda: (Ur, Gr, Vr)):
            break
        # ---- V step: CG on the coupled normal equations, warm-started ----
        GtG = G1.T @ G1                                    # (R2P, R2P), index (b, q)
        GtGp = GtG.reshape(R2 * P, R2, P).permute(2, 0, 1).contiguous().to(dt)   # (P, R2P, R2)
        Ud, G1d = U.to(dt), G1.to(dt)
        rhsQ = (WStd @ Ud) @ G1d                           # (D, R2P)
        rhs = torch.diagonal(rhsQ.reshape(S, P, R2, P), dim1=1, dim2=3).sum(-1)
        r0 = rhs - contract(SQ.to(dt), GtGp)
        Z = torch.einsum("aqbp,pq->ab", GtG.reshape(R2, P, R2, P), Sp)
        Z_inv = spd_solve(Z, torch.eye(R2, dtype=F64, device=W.device)).to(dt)

        def op(X):
            return contract(sigQ(X, Sd), GtGp)

        Vn, _ = pcg(op, rhs, Vd, r0, lambda R: Ss_inv @ R @ Z_inv, cg_tol, cg_max_iter,
                    energy_tol=cg_energy_tol * err)
        if not bool(torch.isfinite(Vn).all()):
            raise diverged(name, "Tucker2-ALS-Sigma", f"CG produced NaN at iteration {it}")
        V = qr(Vn.to(F64))[0]
    U, G1, V = track.best
    return U, G1.reshape(R1, R2, P), V, track.history, track.raw, it, track.converged, base


def _tucker2_one(weight, sigma, ranks, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
                 cg_max_iter, cg_energy_tol, dev, dt, name):
    if weight.dim() != 4:
        raise InputError(f"{layer_label(name)}: Tucker2 needs a conv kernel (T, S, kh, kw), got "
                         f"{tuple(weight.shape)}", hint="use sigma_svd for Linear layers")
    T, S, kh, kw = weight.shape
    P, D = kh * kw, S * kh * kw
    R1, R2 = (int(ranks), int(ranks)) if isinstance(ranks, int) else (int(ranks[0]), int(ranks[1]))
    if not (1 <= R1 <= T and 1 <= R2 <= S):
        raise InputError(f"{layer_label(name)}: Tucker2 ranks ({R1}, {R2}) invalid for T={T}, S={S}",
                         hint="need 1 <= R1 <= T and 1 <= R2 <= S")
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    W3 = W.reshape(T, S, P)
    V0 = _init_V(W3, s_solve, init, R2, seed, dev)
    t0 = time.perf_counter()
    if s_obj is None:
        U, core, V, hist, raw, it, conv = _hooi(W3, R1, R2, V0, max_iter, tol, dt, name)
        base = frob_sq(W)
    else:
        floor = float((torch.diagonal(s_solve) - torch.diagonal(s_obj)).mean())
        del s_obj
        ct = cg_tol if cg_tol is not None else (1e-10 if dt == F64 else 1e-6)
        U, core, V, hist, raw, it, conv, base = _als_sigma(W, s_solve, floor, S, P, R1, R2, V0,
                                                           max_iter, tol, ct, cg_max_iter,
                                                           cg_energy_tol, dt, name)
    rel = hist[-1]
    if not math.isfinite(rel):
        raise diverged(name, "Tucker2", "non-finite final error")
    res = dict(U=U.to(dt), core=core.reshape(R1, R2, kh, kw).to(dt), V=V.to(dt), rel_error=rel,
               history=hist, raw_history=raw, n_iter=it, converged=conv,
               seconds=time.perf_counter() - t0)
    return res, base


def tucker2(weight: torch.Tensor, sigma: torch.Tensor | None, ranks, *, max_iter: int = 50,
            tol: float = 1e-5, seed: int = 0, init="whitened", damping: float = default_damping("tucker2"),
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
        damping: fit in ``Sigma + damping * mean(diag(Sigma)) * I`` (the objective; every
            reported error uses it).  Default ``DAMPING = 1e-3`` (:func:`ddtd.solvers.default_damping`,
            the rule the pipeline uses): undamped, the directions Sigma barely excites are free
            and the factors can grow far beyond ``W`` there (``info['norm_ratio']``).  Ignored
            for Frobenius.
        eps_rel: solver floor on Sigma, see :func:`ddtd.solvers._common.prepare_sigma`.
        cg_tol, cg_max_iter, cg_energy_tol: CG rule for the V step: stop at relative residual
            ``cg_tol`` (default 1e-6 float32, 1e-10 float64), or when a step lowers the Sigma
            error by less than ``cg_energy_tol`` times its current value (0 disables), or after
            ``cg_max_iter`` steps.  CG never increases the error.  Default: 5 warm-started steps
            per V update (the final error of many more steps at less time;
            benchmarks/results/solvers.txt).
        groups: number of groups (inferred from a 3-D sigma).
        device, dtype: compute device; dtype of the returned factors and of the CG products of
            the V step (float32 default).  ``Sigma Q``, the small solves and every reported error
            are float64, so float32 and float64 give the same fit to the CG tolerance.
        name: layer name for error messages.

    Returns:
        :class:`Tucker2Result`.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    gs = split_groups(weight, sigma, groups, name)
    outs = [_tucker2_one(w, s, ranks, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
                         cg_max_iter, cg_energy_tol, dev, dt, name) for w, s in zip(gs.weights, gs.sigmas)]
    d = damping if sigma is not None else 0.0
    if gs.groups == 1:
        r = outs[0][0]
        What = torch.einsum("ta,abij,sb->tsij", r["U"].to(F64), r["core"].to(F64), r["V"].to(F64))
        return Tucker2Result(**r, groups=1, info={"damping": d, **fit_diagnostics(weight, What)})
    rs, bases = [o[0] for o in outs], [o[1] for o in outs]
    What = torch.stack([torch.einsum("ta,abij,sb->tsij", r["U"].to(F64), r["core"].to(F64),
                                     r["V"].to(F64)) for r in rs])
    return Tucker2Result(
        U=torch.stack([r["U"] for r in rs]), core=torch.stack([r["core"] for r in rs]),
        V=torch.stack([r["V"] for r in rs]),
        rel_error=combine_histories([[r["rel_error"]] for r in rs], bases)[0],
        history=combine_histories([r["history"] for r in rs], bases),
        raw_history=combine_histories([r["raw_history"] for r in rs], bases),
        n_iter=max(r["n_iter"] for r in rs), converged=all(r["converged"] for r in rs),
        seconds=sum(r["seconds"] for r in rs), groups=gs.groups,
        info={"damping": d, **fit_diagnostics(weight, What)})
