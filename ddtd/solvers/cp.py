"""CP decomposition of a conv kernel, in the Sigma metric or the Frobenius norm (ALS).

Layouts (``A (T x R)`` output factor, ``B (S x R)`` input-channel factor):

* ``cp3``: ``K~[t,s,p] = sum_r A[t,r] B[s,r] C[p,r]``, ``p = i*kw + j``, ``C (kh*kw x R)``.
  Layers: 1x1 ``S -> R`` (``B^T``), depthwise ``kh x kw`` (``C``), 1x1 ``R -> T`` (``A``).
* ``cp4``: ``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i,r] E[j,r]``, ``C (kh x R)``, ``E (kw x R)``.
  Layers: 1x1, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1.

With ``M`` the Khatri-Rao product of the input factors in unfold order (``D x R``, row
``(s, p)`` / ``(s, i, j)`` = ``prod_k F_k[i_k, r]``), ``W~ = A M^T``.

Sigma-ALS, one iteration:

* ``A = W Sigma M (M^T Sigma M)^{-1}`` (float64 ``R x R`` solve).
* For each input factor ``F_k`` (``n_k x R``): ``M`` is linear in ``F_k``, and the exact
  Sigma-metric least squares has normal equations
  ``H_k(F) = c_k(Sigma KR(.., F, ..) A^T A) = c_k(Sigma W^T A)``, where ``c_k(Y)[i, r] =
  sum_{rows with i_k = i} Y[row, r] prod_{l != k} F_l[i_l, r]``.  Small modes
  (``n_k R <= direct_max``) are solved directly (the ``n_k R`` normal matrix is built with one
  ``D x D x R`` product); large modes (input channels) by preconditioned CG, warm-started, with
  the exact inverse for the Kronecker approximation ``Sigma ~ Sigma_k (x) Sigma_rest`` as
  preconditioner.  Not the Frobenius update: every mode minimises the Sigma error.
  CG stops at relative residual ``cg_tol``, or when one step lowers the Sigma error by less
  than ``cg_energy_tol`` (default 1e-4) times its current value: the CG step decrease is
  exactly ``alpha * r^T z`` of the objective, and on activation covariances the ALS errors
  with this rule match those of 50-step solves to about 0.1% (1e-5: to 5 digits).
* Input factors are column-normalised after their update, the scale moved into ``A`` (so
  ``W~`` is unchanged).

Frobenius ALS (``sigma=None``): the usual normal equations with Hadamard products of Grams.
Per iteration only two large products are formed: ``W M`` (MTTKRP of ``A``, with ``M`` formed
explicitly, only ``D x R``) and ``X = A^T W`` (``R x D``); all input-mode MTTKRPs are then
cheap contractions of ``X`` (``X`` does not depend on the input factors; after ``B`` is
updated, ``Z = sum_s X[:, s, ...] B[s, :]`` serves the spatial modes).

The error is evaluated after each ``A`` update, for ``A`` rounded to ``dtype`` and the input
factors as stored (in ``dtype``): ``trace(W S W^T) - 2 <A, W S M> + <A^T A, M^T S M>`` with
``S M`` recomputed in float64 for that iterate (``S`` the objective Sigma; Frobenius:
``M^T M`` = the Hadamard product of the Grams).  All updates are minimisations (the CG ones
up to their tolerance in ``dtype``); the iterate of least exact error is returned and the
history is the running best of that error.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, layer_label

from ._common import (IterativeResult, BestIterate, eigh, qr, EPS_REL, F64, check_finite, combine_histories,
                      default_damping, diverged, error_from_terms, fit_diagnostics, frob_sq, pcg,
                      prepare_sigma, resolve_device_dtype, rounded, spd_solve,
                      split_groups)


@dataclass(frozen=True)
class CPResult(IterativeResult):
    """CP factors.

    Attributes:
        layout: ``'cp3'`` or ``'cp4'``.
        A: ``(T, R)`` output factor (carries the scale).
        B: ``(S, R)`` input-channel factor (unit columns).
        C: ``cp3``: ``(kh*kw, R)`` spatial factor, ``p = i*kw + j``; ``cp4``: ``(kh, R)``.
        E: ``cp4``: ``(kw, R)``; ``None`` for ``cp3``.
        Grouped layers: every factor gets a leading group dim ``g`` (``A (g, T/g, R)`` ...).
        kernel_size: ``(kh, kw)``.
        rel_error: relative squared error ``trace(dW S dW^T) / trace(W S W^T)`` of the returned
            factors (``S`` = the damped Sigma, the identity for Frobenius) = ``history[-1]``.
        history: the best relative error among the iterates so far, after each iteration
            (non-increasing); every entry is the exact (float64) error of an iterate whose
            factors are rounded to ``dtype``, and the returned factors are that of the last.
        raw_history: error of each iterate, same measure.
        n_iter, converged, seconds, groups: as in the other results.
        info: ``damping``, ``norm_ratio``, ``identity_error`` (:func:`ddtd.solvers.fit_diagnostics`).
    """

    layout: str
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    E: torch.Tensor | None
    kernel_size: tuple

    def kernel(self) -> torch.Tensor:
        """Approximated kernel ``(T, S, kh, kw)`` (grouped: ``(g, T/g, S/g, kh, kw)``)."""
        kh, kw = self.kernel_size
        if self.groups == 1:
            if self.layout == "cp3":
                return torch.einsum("tr,sr,pr->tsp", self.A, self.B, self.C).reshape(
                    self.A.shape[0], self.B.shape[0], kh, kw)
            return torch.einsum("tr,sr,ir,jr->tsij", self.A, self.B, self.C, self.E)
        if self.layout == "cp3":
            g, T = self.A.shape[:2]
            return torch.einsum("gtr,gsr,gpr->gtsp", self.A, self.B, self.C).reshape(
                g, T, self.B.shape[1], kh, kw)
        return torch.einsum("gtr,gsr,gir,gjr->gtsij", self.A, self.B, self.C, self.E)


def khatri_rao(factors: list[torch.Tensor]) -> torch.Tensor:
    """Row ``(i_1, ..., i_m)`` (C order, first factor slowest) = ``prod_k F_k[i_k, :]``."""
    M = factors[0]
    for F in factors[1:]:
        M = (M[:, None, :] * F[None, :, :]).reshape(-1, M.shape[1])
    return M


def _grams_hadamard(grams: list[torch.Tensor], skip: int | None = None) -> torch.Tensor:
    out = None
    for i, G in enumerate(grams):
        if i == skip:
            continue
        out = G.clone() if out is None else out * G
    return out


def _init_factors(W, dims, R, init, seed, dev, dt):
    """Input factors (list, one per mode of ``dims``), unit columns, float64."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    m = len(dims)
    Wt = W.reshape(W.shape[0], *dims).to(F64)
    facs = []
    for k in range(m):
        n = dims[k]
        if init == "random":
            F = torch.randn(n, R, generator=g, dtype=F64).to(dev)
        elif init == "svd":
            Mk = Wt.movedim(k + 1, 0).reshape(n, -1)
            w, V = eigh(Mk @ Mk.T)
            V = V.flip(1)
            q = min(n, R)
            F = torch.randn(n, R, generator=g, dtype=F64).to(dev)
            F[:, :q] = V[:, :q]
        else:
            raise InputError(f"unknown CP init {init!r}",
                             hint="use 'svd', 'random', 'frobenius' or a list of input factors")
        facs.append(F / F.norm(dim=0, keepdim=True).clamp_min(1e-300))
    return facs


def _normalise(F, A):
    """Unit-normalise the columns of F and move the scale into A (``A M^T`` is unchanged).
    Returns ``(F / n, A * n, n)``; the caller rescales anything linear in A or F."""
    n = F.norm(dim=0)
    n = torch.where(n > 0, n, torch.ones_like(n))
    return F / n, A * n, n


def _check(x, name, it, what="factor"):
    if not bool(torch.isfinite(x).all()):
        raise diverged(name, "CP-ALS", f"non-finite {what} at iteration {it}")


def _als_frobenius(W, dims, A, facs, max_iter, tol, dt, name):
    T, D = W.shape
    m = len(dims)
    Wd = W.to(dt)
    base = frob_sq(W)
    facs = [f.to(dt) for f in facs]
    track = BestIterate(tol, max_iter, name, "CP-ALS")
    it = 0
    for it in range(1, max_iter + 1):
        grams = [f.T.to(F64) @ f.to(F64) for f in facs]
        M64 = khatri_rao([f.to(F64) for f in facs])
        MT = W @ M64                                                   # (T, R) float64
        G = _grams_hadamard(grams)                                     # M^T M
        A = spd_solve(G, MT, right=True)
        _check(A, name, it)
        Ar = rounded(A, dt)
        err = error_from_terms(base, float((Ar * MT).sum()), float(((Ar.T @ Ar) * G).sum()),
                               lambda: frob_sq(W - Ar @ M64.T))
        if track.step(err / base, it, lambda: (Ar, [f.clone() for f in facs])):
            break
        AtA = A.T @ A
        X = (A.to(dt).T @ Wd).reshape(-1, dims[0], D // dims[0])     # (R, S, rest)
        # mode 0 (input channels)
        Mrest = khatri_rao(facs[1:]) if m > 1 else None
        MT0 = (X * Mrest.T[:, None, :]).sum(-1).T.to(F64)              # (S, R)
        F = spd_solve(AtA * _grams_hadamard(grams, skip=0), MT0, right=True)
        _check(F, name, it)
        F, A, n = _normalise(F, A)
        X = X * n.to(dt)[:, None, None]
        facs[0] = F.to(dt)
        grams[0] = F.T @ F
        AtA = A.T @ A
        Z = torch.einsum("rsq,sr->rq", X, facs[0]).reshape(-1, *dims[1:])   # (R, *spatial)
        for k in range(1, m):
            # MTTKRP of spatial mode k from Z (R, n_1..n_{m-1})
            Zk = Z
            for l in range(1, m):
                if l != k:
                    shape = [1] * (m - 1)
                    shape[l - 1] = dims[l]
                    Zk = Zk * facs[l].T.reshape(-1, *shape)
            red = [l for l in range(1, m) if l != k]
            MTk = Zk.sum(dim=red) if red else Zk
            MTk = MTk.T.to(F64)                                             # (n_k, R)
            F = spd_solve(AtA * _grams_hadamard(grams, skip=k), MTk, right=True)
            _check(F, name, it)
            F, A, n = _normalise(F, A)
            Z = Z * n.to(dt).reshape(-1, *([1] * (m - 1)))
            facs[k] = F.to(dt)
            grams[k] = F.T @ F
            AtA = A.T @ A
    A, facs = track.best
    return A, facs, track.history, track.raw, it, track.converged, base


class _SigmaModes:
    """Per-mode cached views of Sigma for the Sigma-ALS.  The last mode's columns, when solved
    directly, are kept in float64: its product ``Sigma[:, (j, .)] M_k`` then also gives the
    float64 ``Sigma M`` of the next iterate (the exact error needs it)."""

    def __init__(self, Sg, dims, R, dt, direct_max):
        D = Sg.shape[0]
        self.D, self.dims, self.dt = D, dims, dt
        self.S = Sg.to(dt)
        self.Sg = Sg
        self.direct = [dims[k] * R <= direct_max for k in range(len(dims))]
        self.cols = {}
        self.kron = {}
        for k, n in enumerate(dims):
            if self.direct[k]:
                # Sigma with columns regrouped: (n_k, D, rest), [j, d, o] = Sigma[d, (j at k, o)]
                src = Sg if k == len(dims) - 1 else self.S
                Sk = src.reshape(D, *dims).movedim(1 + k, 0).reshape(n, D, D // n)
                self.cols[k] = Sk.contiguous()
            else:
                # Sigma as (n_k, rest, n_k, rest) blocks, float64, for the preconditioner
                self.kron[k] = Sg.reshape(*dims, *dims).permute(
                    k, *[i for i in range(len(dims)) if i != k],
                    len(dims) + k, *[len(dims) + i for i in range(len(dims)) if i != k]
                ).reshape(n, D // n, n, D // n).contiguous()

    def precond(self, k, Mk, AtA):
        """``(Xs^{-1}, Yg^{-1})``: the mode-k normal operator is
        ``X -> sum_{o,o'} Sigma_{oo'} X G_{o'o}`` with ``G_{o'o} = diag(Mk[o']) AtA diag(Mk[o])``
        (``Sigma_{oo'}`` the ``n_k x n_k`` blocks); replacing Sigma by the Kronecker product of its
        partial traces ``Xs (x) Srest`` makes it ``X -> Xs X Yg``, ``Yg = AtA * (Mk^T Srest Mk)``,
        whose exact inverse is the preconditioner.  (A Van Loan nearest-Kronecker fit of the
        operator itself was tried and converged slower on activation covariances.)"""
        S4 = self.kron[k]
        n = S4.shape[0]
        Xs = torch.einsum("aobo->ab", S4)
        Srest = torch.einsum("aoaq->oq", S4) / (float(torch.diagonal(Xs).sum()) or 1.0)
        Yg = AtA * (Mk.T @ Srest @ Mk)
        Xi = spd_solve(Xs, torch.eye(n, dtype=F64, device=S4.device)).to(self.dt)
        Yi = spd_solve(Yg, torch.eye(Yg.shape[0], dtype=F64, device=S4.device)).to(self.dt)
        return lambda Rm: Xi @ Rm @ Yi


def _contract_except(Y, facs, dims, k):
    """``c_k(Y)[i, r] = sum_{rows with i_k = i} Y[row, r] prod_{l != k} F_l[i_l, r]``."""
    n = dims[k]
    R = Y.shape[-1]
    Yk = Y.reshape(*dims, R).movedim(k, 0).reshape(n, -1, R)
    others = [facs[l] for l in range(len(dims)) if l != k]
    Mk = khatri_rao(others)
    return (Yk * Mk[None]).sum(1)


def _als_sigma(W, Sg, floor, dims, A, facs, max_iter, tol, cg_tol, cg_max_iter, cg_energy_tol,
               direct_max, dt, name):
    """Sigma-ALS (module docstring) on ``W (T, D)`` float64: ``Sg`` the solve Sigma (float64,
    :func:`prepare_sigma`'s ``sigma_solve``), the objective ``Sg - floor * I``.

    Each iteration starts with ``Sg M`` in float64 for the current (``dt``) input factors (the
    last direct mode's float64 product provides it), the float64 ``A`` step and the exact
    objective error of ``(A rounded to dt, input factors)`` from float64 terms (the floor removed
    on the ``R x R`` / ``T x R`` matrices); the input-factor updates then run in ``dt``.
    """
    T, D = W.shape
    m = len(dims)
    R = facs[0].shape[1]
    modes = _SigmaModes(Sg, dims, R, dt, direct_max)
    Sd = modes.S
    WS = W @ Sg                                           # (T, D) float64
    base = float((WS * W).sum()) - floor * frob_sq(W)     # objective
    WSt = WS.T.to(dt).contiguous()
    facs = [f.to(dt) for f in facs]
    SM_next = None                      # float64 Sg M of the next iterate, when known
    track = BestIterate(tol, max_iter, name, "CP-ALS-Sigma")
    it = 0
    for it in range(1, max_iter + 1):
        M64 = khatri_rao([f.to(F64) for f in facs])
        SM64 = Sg @ M64 if SM_next is None else SM_next
        SM_next = None
        WSM = WS @ M64
        MSM = M64.T @ SM64
        MSM = 0.5 * (MSM + MSM.T)
        A = spd_solve(MSM, WSM, right=True)
        _check(A, name, it)
        Ar = rounded(A, dt)
        WSMo = WSM - floor * (W @ M64)                    # objective terms
        MSMo = MSM - floor * (M64.T @ M64)

        def residual(Ar=Ar, M64=M64):
            E = W - Ar @ M64.T
            return float(((E @ Sg) * E).sum()) - floor * frob_sq(E)

        err = error_from_terms(base, float((Ar * WSMo).sum()), float(((Ar.T @ Ar) * MSMo).sum()),
                               residual)
        if track.step(err / base, it, lambda: (Ar, [f.clone() for f in facs])):
            break
        SM = SM64.to(dt)                                  # Sg M, kept current below
        SWA = WSt @ A.to(dt)                                  # Sigma W^T A (D, R)
        for k in range(m):
            AtA = A.T @ A
            AtAd = AtA.to(dt)
            rhs = _contract_except(SWA, facs, dims, k)
            n = dims[k]
            if modes.direct[k]:
                others = [facs[l] for l in range(m) if l != k]
                last = k == m - 1                              # float64 columns (_SigmaModes)
                Mk = khatri_rao([f.to(F64) for f in others] if last else others)   # (rest, R)
                Y = torch.matmul(modes.cols[k], Mk)            # (n, D, R): Sigma[:, (j,.)] Mk
                Yp = Y.reshape(n, *dims, R).movedim(1 + k, 1).reshape(n, n, D // n, R)
                Nb = torch.einsum("or,jioq->irjq", Mk, Yp).to(F64)   # [i, r, j, q]
                N = (Nb * AtA[None, :, None, :]).reshape(n * R, n * R)
                F = spd_solve(N, rhs.to(F64).reshape(n * R, 1)).reshape(n, R)
                _check(F, name, it)
                F, A, s = _normalise(F, A)
                Fd = F.to(dt)
                if last:                # Sigma_solve M of the next iterate, float64
                    SM_next = torch.einsum("jdr,jr->dr", Y, Fd.to(F64))
                else:
                    SM = torch.einsum("jdr,jr->dr", Y, Fd)
            else:
                others = [facs[l] for l in range(m) if l != k]
                Mk = khatri_rao(others)
                pre = modes.precond(k, Mk.to(F64), AtA)
                fl = list(facs)

                def op(X, k=k, fl=fl):
                    fl[k] = X
                    L = Sd @ khatri_rao(fl)
                    return _contract_except(L @ AtAd, fl, dims, k), L

                r0 = rhs - _contract_except(SM @ AtAd, facs, dims, k)
                F, _, SM = pcg(op, rhs, facs[k], r0, pre, cg_tol, cg_max_iter, track=SM,
                               energy_tol=cg_energy_tol * err)
                _check(F, name, it)
                F, A, s = _normalise(F.to(F64), A)
                Fd = F.to(dt)
                SM = SM / s.to(dt)
            facs[k] = Fd
            SWA = SWA * s.to(dt)
    A, facs = track.best
    return A, facs, track.history, track.raw, it, track.converged, base


def _cp_one(weight, sigma, rank, layout, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
            cg_max_iter, cg_energy_tol, direct_max, init_iter, dev, dt, name):
    if weight.dim() != 4:
        raise InputError(f"{layer_label(name)}: CP needs a conv kernel (T, S, kh, kw), got "
                         f"{tuple(weight.shape)}", hint="use sigma_svd for Linear layers")
    if layout not in ("cp3", "cp4"):
        raise InputError(f"unknown CP layout {layout!r}", hint="use 'cp3' or 'cp4'")
    T, S, kh, kw = weight.shape
    D = S * kh * kw
    R = int(rank)
    if R < 1:
        raise InputError(f"{layer_label(name)}: CP rank must be >= 1, got {R}", hint="choose rank >= 1")
    dims = (S, kh * kw) if layout == "cp3" else (S, kh, kw)
    check_finite(weight, "weight", name)
    W = weight.reshape(T, D).to(device=dev, dtype=F64)
    s_obj, s_solve = prepare_sigma(sigma, D, damping=damping, eps_rel=eps_rel, device=dev, name=name)
    t0 = time.perf_counter()
    A0 = torch.zeros(T, R, dtype=F64, device=dev)
    if isinstance(init, (list, tuple)):
        if len(init) != len(dims) or any(tuple(f.shape) != (d, R) for f, d in zip(init, dims)):
            raise InputError(f"init factors must have shapes {[(d, R) for d in dims]}",
                             hint="pass the input factors [B, C] (cp3) or [B, C, E] (cp4)")
        facs = [f.to(device=dev, dtype=F64) for f in init]
    elif init == "frobenius" or (init == "auto" and s_obj is not None):
        facs = _init_factors(W, dims, R, "svd", seed, dev, dt)
        facs = _als_frobenius(W, dims, A0, facs, init_iter, 0.0, dt, name)[1]
        facs = [f.to(F64) for f in facs]
    else:
        facs = _init_factors(W, dims, R, "svd" if init == "auto" else init, seed, dev, dt)
    if s_obj is None:
        A, facs, hist, raw, it, conv, base = _als_frobenius(W, dims, A0, facs, max_iter, tol, dt,
                                                            name)
    else:
        ct = cg_tol if cg_tol is not None else (1e-10 if dt == F64 else 1e-6)
        floor = float((torch.diagonal(s_solve) - torch.diagonal(s_obj)).mean())
        del s_obj
        A, facs, hist, raw, it, conv, base = _als_sigma(W, s_solve, floor, dims, A0, facs,
                                                        max_iter, tol, ct, cg_max_iter,
                                                        cg_energy_tol, direct_max, dt, name)
    rel = hist[-1]
    if not math.isfinite(rel):
        raise diverged(name, "CP-ALS", "non-finite final error")
    res = dict(layout=layout, A=A.to(dt), B=facs[0].to(dt), C=facs[1].to(dt),
               E=facs[2].to(dt) if layout == "cp4" else None, kernel_size=(kh, kw),
               rel_error=rel, history=hist, raw_history=raw, n_iter=it, converged=conv,
               seconds=time.perf_counter() - t0)
    return res, base


def cp_als(weight: torch.Tensor, sigma: torch.Tensor | None, rank: int, *, layout: str = "cp3",
           max_iter: int = 100, tol: float = 1e-6, seed: int = 0, init="auto",
           damping: float = default_damping("cp3"), eps_rel: float = EPS_REL,
           cg_tol: float | None = None,
           cg_max_iter: int = 5, cg_energy_tol: float = 1e-4, direct_max: int = 4096,
           init_iter: int = 10,
           groups: int | None = None, device=None, dtype: torch.dtype | None = None,
           name: str | None = None) -> CPResult:
    """CP decomposition of a conv kernel fitted in the Sigma metric (or Frobenius).

    Args:
        weight: ``(T, S, kh, kw)`` kernel (grouped: ``(T, S/g, kh, kw)``).
        sigma: ``(D, D)`` input covariance (``(g, D_g, D_g)`` grouped) or ``None`` (Frobenius).
        rank: CP rank ``R`` (per group).
        layout: ``'cp3'`` (kernel modes merged) or ``'cp4'``.
        max_iter: maximum ALS iterations; tol: stop on relative decrease of the error below tol.
        seed: seeds the random parts of the init.
        init: ``'auto'`` (= ``'frobenius'`` with a sigma, ``'svd'`` without), ``'svd'`` (leading
            singular vectors of the unfoldings, random columns beyond the mode size),
            ``'random'``, ``'frobenius'`` (``init_iter`` fast Frobenius ALS iterations from
            ``'svd'``, the default with a sigma: a better start for the Sigma iterations,
            benchmarks/results/solvers.txt), or a list of input factors
            ``[B, C]`` / ``[B, C, E]``.
        damping: fit in ``Sigma + damping * mean(diag(Sigma)) * I`` (the objective; every
            reported error uses it).  Default ``DAMPING = 1e-3`` (:func:`ddtd.solvers.default_damping`,
            the pipeline's rule): undamped, directions Sigma barely excites are free and CP
            factors grow along them (``info['norm_ratio']``).  Ignored for Frobenius.
        eps_rel: solver floor, see :func:`ddtd.solvers._common.prepare_sigma`.
        cg_tol, cg_max_iter, cg_energy_tol: CG rule for input modes with ``n_k R > direct_max``:
            stop at relative residual ``cg_tol`` (default 1e-6 float32 / 1e-10 float64), or when
            a CG step lowers the layer's Sigma error by less than ``cg_energy_tol`` times its
            current value (the rest of the solve cannot change the result materially; 0
            disables), or after ``cg_max_iter`` steps.  CG never increases the error.  The
            default of 5 warm-started steps per update (an inexact solve of the exact Sigma
            normal equations, converging to the same fixed point across iterations) was measured
            on activation covariances at 1.6x less time per iteration than 50 steps, for a final
            error 0.3% higher after 10 iterations; pass ``cg_max_iter=50, cg_energy_tol=0`` for
            tight solves.
        direct_max: modes with ``n_k * R <= direct_max`` unknowns are solved directly.
        groups, device, name: as in :func:`ddtd.solvers.tucker2`.
        dtype: of the returned factors and of the input-factor updates (float32 default); the
            ``A`` step, ``Sigma M`` of each iterate and every reported error are float64.

    Returns:
        :class:`CPResult`.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    gs = split_groups(weight, sigma, groups, name)
    outs = [_cp_one(w, s, rank, layout, max_iter, tol, seed, init, damping, eps_rel, cg_tol,
                    cg_max_iter, cg_energy_tol, direct_max, init_iter, dev, dt, name)
            for w, s in zip(gs.weights, gs.sigmas)]
    d = damping if sigma is not None else 0.0
    if gs.groups == 1:
        return with_info(CPResult(**outs[0][0], groups=1), weight, d)
    rs, bases = [o[0] for o in outs], [o[1] for o in outs]
    return with_info(CPResult(
        layout=layout, A=torch.stack([r["A"] for r in rs]), B=torch.stack([r["B"] for r in rs]),
        C=torch.stack([r["C"] for r in rs]),
        E=torch.stack([r["E"] for r in rs]) if layout == "cp4" else None,
        kernel_size=rs[0]["kernel_size"],
        rel_error=combine_histories([[r["rel_error"]] for r in rs], bases)[0],
        history=combine_histories([r["history"] for r in rs], bases),
        raw_history=combine_histories([r["raw_history"] for r in rs], bases),
        n_iter=max(r["n_iter"] for r in rs), converged=all(r["converged"] for r in rs),
        seconds=sum(r["seconds"] for r in rs), groups=gs.groups), weight, d)


def with_info(res: CPResult, weight: torch.Tensor, damping: float) -> CPResult:
    """``res`` with ``info = {"damping": damping, **fit_diagnostics(weight, W~)}`` (``W~`` rebuilt
    from the factors in float64)."""
    r64 = dataclasses.replace(res, A=res.A.to(F64), B=res.B.to(F64), C=res.C.to(F64),
                              E=None if res.E is None else res.E.to(F64))
    return dataclasses.replace(res, info={"damping": float(damping),
                                          **fit_diagnostics(weight, r64.kernel())})


def cp3(weight, sigma, rank, **kw) -> CPResult:
    """:func:`cp_als` with ``layout='cp3'``."""
    return cp_als(weight, sigma, rank, layout="cp3", **kw)


def cp4(weight, sigma, rank, **kw) -> CPResult:
    """:func:`cp_als` with ``layout='cp4'``."""
    return cp_als(weight, sigma, rank, layout="cp4", **kw)
