"""Sigma-SVD: the best rank-``r`` approximation of a layer weight in the Sigma metric.

Maths.  With ``Sigma = L L^T`` the objective is ``||(W - W~) L||_F^2``.  For any rank-``r`` ``W~``
with column space ``span(U)`` (``U`` orthonormal, ``T x r``) the best choice is ``W~ = U U^T W``
and its error is ``trace(W Sigma W^T) - trace(U^T W Sigma W^T U)``; this is minimised by the
top-``r`` eigenvectors of ``W Sigma W^T`` (= the top-``r`` left singular vectors of ``W L``).
So ``A = U_r`` (``T x r``), ``B = U_r^T W`` (``r x D``), ``W~ = A B``, and the error is the sum of
the discarded eigenvalues of ``W Sigma W^T``.  No factor of Sigma is needed, hence no clipping
constant: a singular Sigma is handled exactly.

Cross-moment ("sequential calibration") variant, :func:`sigma_svd_cross`: minimise
``E||W x - W~ x~||^2`` where ``x~`` is the input the layer sees after the earlier layers were
compressed.  With ``Sxx = E[x x^T]``, ``Sxt = E[x x~^T]``, ``Stt = E[x~ x~^T]``:
``E||W x - W~ x~||^2 = tr(W Sxx W^T) - 2 tr(W Sxt W~^T) + tr(W~ Stt W~^T)``
``                 = tr((Z - W~) Stt (Z - W~)^T) + tr(W Sxx W^T) - tr(Z Stt Z^T)``
with ``Z = W Sxt Stt^+`` (using ``Sxt Stt^+ Stt = Sxt``, true because a direction ``v`` with
``v^T Stt v = E[(v^T x~)^2] = 0`` has ``Sxt v = E[x (x~^T v)] = 0``).  The second part does not
depend on ``W~``, so ``W~`` is the best rank-``r`` approximation of ``Z`` in the ``Stt`` metric:
``A = U_r``, top eigenvectors of ``Z Stt Z^T = W Sxt Stt^+ Sxt^T W^T``, and ``B = U_r^T Z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ddtd.errors import InputError, layer_label

from ._common import (CANCEL, checked_sigma, damp, default_damping, eigh, error_from_terms, fit_diagnostics, F64,
                      check_finite, combine_histories, resolve_device_dtype, rounded, sigma_error,
                      split_groups)


@dataclass(frozen=True)
class SVDResult:
    """Rank-``r`` factorisation ``W~ = A @ B``.

    Attributes:
        A: ``(T, r)`` output factor (orthonormal columns); grouped: ``(g, T/g, r)``.
        B: ``(r, D)`` input factor, ``D = S*kh*kw`` in unfold order (reshape to ``(r, S, kh, kw)``
           for the first conv); grouped: ``(g, r, D_g)``.
        rel_error: relative squared Sigma error ``trace(dW Sigma dW^T) / trace(W Sigma W^T)`` of
           ``A @ B`` as returned (in ``dtype``), Sigma damped as asked (cross variant:
           ``E||W x - W~ x~||^2 / E||W x||^2``).
        history: ``[rel_error]`` (closed form, one "iteration").
        n_iter, converged: ``1``, ``True``.
        groups: number of groups (1 for an ordinary layer).
        info: ``damping``, ``norm_ratio``, ``identity_error`` (see
           :func:`ddtd.solvers.fit_diagnostics`).
    """

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    history: list = field(default_factory=list)
    n_iter: int = 1
    converged: bool = True
    groups: int = 1
    info: dict = field(default_factory=dict)

    def matrix(self) -> torch.Tensor:
        """``W~`` as ``(T, D)`` (grouped: ``(g, T/g, D_g)``)."""
        return self.A @ self.B


def _check_rank(rank: int, T: int, D: int, name) -> int:
    r = int(rank)
    if r < 1 or r > min(T, D):
        raise InputError(f"{layer_label(name)}: rank {r} is outside [1, min(T, D) = {min(T, D)}]",
                         hint="choose a smaller rank (see ddtd.solvers.formats for budgets)")
    return r


def _svd_one(W: torch.Tensor, sigma, rank: int, damping: float, dev, dtype, name):
    """One group: ``(A, B)`` in ``dtype``, their relative error, its numerator and ``base``.

    ``A = U_r``, ``B = U_r^T W`` are rounded to ``dtype``; the error is that of the rounded
    ``A @ B``: the sum of the discarded eigenvalues for float64, else ``trace(W S W^T) -
    2 trace(A B S W^T) + trace(A^T A  B S B^T)`` in float64, with ``B S B^T`` expanded around
    the unrounded ``B0 = U^T W`` (``dB = B - B0``): ``U^T (W S W^T) U + (U^T W S) dB^T +
    dB (U^T W S)^T``, i.e. without the second-order ``dB S dB^T`` (at most ``2^-48 lambda_max(S)
    ||W||_F^2``); no product with ``S`` beyond ``W S``.  Small errors (:data:`CANCEL`) are
    taken from the explicit residual.
    """
    T, D = W.shape
    r = _check_rank(rank, T, D, name)
    W64 = W.to(device=dev, dtype=F64)
    check_finite(W64, "weight", name)
    if sigma is None:
        S = None
        WS = W64
    else:
        S = damp(checked_sigma(sigma, D, dev, name), damping)
        WS = W64 @ S
    X = WS @ W64.T
    X = 0.5 * (X + X.T)
    w, V = eigh(X)
    w, V = w.flip(0), V.flip(1)
    base = float(w.sum())
    U = V[:, :r]
    B = U.T @ W64
    if dtype == F64:
        err = float(w[r:].clamp_min(0).sum())
    else:
        Ur, Br = rounded(U, dtype), rounded(B, dtype)
        UWS = U.T @ WS                                     # (r, D)
        dBt = (Br - B).T
        BSB = U.T @ X @ U + UWS @ dBt
        BSB = BSB + BSB.T - U.T @ X @ U                    # U^T X U + UWS dB^T + dB UWS^T
        err = error_from_terms(base, float(((Ur @ Br) * WS).sum()),
                               float((BSB * (Ur.T @ Ur)).sum()),
                               lambda: sigma_error(W64 - Ur @ Br, S, F64))
        U, B = Ur, Br
    rel = err / base if base > 0 else 0.0
    return U.to(dtype), B.to(dtype), rel, err, base


def _info(weight, approx, damping) -> dict:
    return {"damping": float(damping), **fit_diagnostics(weight, approx)}


def sigma_svd(weight: torch.Tensor, sigma: torch.Tensor | None, rank: int, *,
              damping: float = default_damping("svd"), groups: int | None = None, device=None,
              dtype: torch.dtype | None = None, name: str | None = None) -> SVDResult:
    """Best rank-``rank`` approximation ``W~ = A B`` of ``weight`` in the Sigma metric.

    Args:
        weight: ``(T, D)`` Linear weight or ``(T, S, kh, kw)`` conv kernel (flattened to ``T x D``).
        sigma: ``(D, D)`` PSD input covariance, ``(g, D_g, D_g)`` for grouped convs, or ``None``
            for the Frobenius norm (plain truncated SVD).
        rank: ``r``; per group for grouped layers.
        damping: adds ``damping * mean(diag(Sigma)) * I`` to Sigma.  Default
            ``default_damping('svd') = 0`` (:func:`ddtd.solvers.default_damping`; the one rule
            of the solvers and the pipeline): the closed form is exact for a singular Sigma and
            ``W~ = U U^T W`` is a projection of ``W``, so it cannot grow.
        groups: number of groups (inferred from a 3-D ``sigma``).
        device, dtype: where to compute / dtype of returned factors (float32 default); the
            eigen-decomposition is always float64, and ``rel_error`` is the error of the
            factors as returned.
        name: layer name, used in error messages.

    Returns:
        :class:`SVDResult`.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    gs = split_groups(weight, sigma, groups, name)
    outs = [_svd_one(w.reshape(w.shape[0], -1), s, rank, damping, dev, dt, name)
            for w, s in zip(gs.weights, gs.sigmas)]
    if gs.groups == 1:
        U, B, rel, _, _ = outs[0]
        return SVDResult(U, B, rel, [rel], 1, True, 1, _info(weight, U.to(F64) @ B.to(F64), damping))
    bases = [o[4] for o in outs]
    rel = combine_histories([[o[2]] for o in outs], bases)[0]
    A, B = torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    return SVDResult(A, B, rel, [rel], 1, True, gs.groups,
                     _info(weight, A.to(F64) @ B.to(F64), damping))


def sigma_svd_cross(weight: torch.Tensor, sigma_xx: torch.Tensor, sigma_xxt: torch.Tensor,
                    sigma_xtxt: torch.Tensor, rank: int, *, eps_rel: float = 1e-12,
                    device=None, dtype: torch.dtype | None = None,
                    name: str | None = None) -> SVDResult:
    """Sequential-calibration SVD: minimise ``E||W x - W~ x~||^2`` over rank-``r`` ``W~ = A B``.

    Args:
        weight: ``(T, D)`` or conv kernel ``(T, S, kh, kw)`` (groups = 1).
        sigma_xx: ``E[x x^T]`` (D, D), original inputs (only used for the reported error).
        sigma_xxt: ``E[x x~^T]`` (D, D), rows indexed by the original input ``x``.
        sigma_xtxt: ``E[x~ x~^T]`` (D, D), inputs after earlier compressed layers.
        rank: ``r``.
        eps_rel: eigenvalues of ``sigma_xtxt`` below ``eps_rel * max`` are treated as zero in its
            pseudo-inverse (directions ``x~`` never visits; they do not affect the objective, see
            module docstring).

    Returns:
        :class:`SVDResult` with ``A (T, r)``, ``B (r, D)``; ``rel_error`` is
        ``E||W x - W~ x~||^2 / E||W x||^2``.
    """
    dev, dt = resolve_device_dtype(weight, device, dtype)
    W = weight.reshape(weight.shape[0], -1).to(device=dev, dtype=F64)
    T, D = W.shape
    r = _check_rank(rank, T, D, name)
    check_finite(W, "weight", name)
    mats = []
    for nm, m in (("sigma_xx", sigma_xx), ("sigma_xxt", sigma_xxt), ("sigma_xtxt", sigma_xtxt)):
        if m.shape != (D, D):
            raise InputError(f"{layer_label(name)}: {nm} has shape {tuple(m.shape)}, expected ({D}, {D})",
                             hint="all three moments are over the unfolded layer input")
        check_finite(m, nm, name)
        mats.append(m.to(device=dev, dtype=F64))
    Sxx, Sxt, Stt = mats
    Sxx = 0.5 * (Sxx + Sxx.T)
    Stt = 0.5 * (Stt + Stt.T)
    lam, Q = eigh(Stt)
    keep = lam > eps_rel * float(lam.max().clamp_min(0))
    Qk, lk = Q[:, keep], lam[keep]
    Z = ((W @ Sxt) @ Qk / lk) @ Qk.T          # W Sxt Stt^+
    ZL = Z @ Qk * lk.sqrt()                    # Z Stt^{1/2} (on the range of Stt)
    X = ZL @ ZL.T
    w, V = eigh(0.5 * (X + X.T))
    U = V.flip(1)[:, :r]
    U, B = rounded(U, dt), rounded(U.T @ Z, dt)
    Wt = U @ B
    base = float((W @ Sxx * W).sum())
    err = base - 2 * float((W @ Sxt * Wt).sum()) + float((Wt @ Stt * Wt).sum())
    rel = max(err, 0.0) / base if base > 0 else 0.0
    return SVDResult(U.to(dt), B.to(dt), rel, [rel], 1, True, 1, _info(W, Wt, 0.0))
