"""Shared numerics for the per-layer solvers.

Conventions (all solvers):

* ``weight`` is a Linear weight ``(T, D)`` or a conv kernel ``(T, S, kh, kw)``; as a matrix
  ``W = weight.reshape(T, D)``, ``D = S*kh*kw``, columns in (channel, row, col) order, the order
  of ``torch.nn.functional.unfold``.
* ``sigma`` is the ``(D, D)`` symmetric PSD input second moment (or centred covariance, the caller
  chooses) or ``None`` for the Frobenius norm (``Sigma = I``).  Grouped convs: ``(g, D_g, D_g)``.
* Objective: ``err(W~) = trace((W - W~) Sigma (W - W~)^T)``; every error a solver reports is the
  *relative squared* Sigma error ``err(W~) / trace(W Sigma W^T)``.

* Damping: ``Sigma`` is replaced by ``Sigma + damping * mean(diag(Sigma)) * I`` (the *objective*
  Sigma, :func:`prepare_sigma`); the default is :func:`default_damping` of the method
  (:data:`DAMPING` = ``1e-3`` for every solver but the Sigma-SVD, ``0`` for it).
* Every result carries ``info`` with ``damping``, ``norm_ratio = ||W~||_F / ||W||_F`` and
  ``identity_error = ||W - W~||_F / ||W||_F`` (:func:`fit_diagnostics`).

Precision policy.  Every error a solver reports, in its history too, is the error of factors
exactly as it returns them (rounded to ``dtype``), measured in float64 with the objective Sigma:
either from the explicit residual or from float64 terms ``trace(W S W^T) - 2 trace(W~ S W^T) +
trace(W~ S W~^T)`` whose products with Sigma are float64 (:func:`error_from_terms`, which falls back
to the residual when the subtraction would lose digits).  Which iterate is returned, and when
the iterations stop, are decided on these numbers.  Gram matrices, ``R x R`` / ``n R x n R``
solves and eigen-decompositions are float64; the products that only steer an update (the
conjugate-gradient operator of an input factor) run in ``dtype`` (float32 by default): an
inexact update can only make an iterate worse, which the exact error then shows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ddtd.errors import InputError, layer_label, NumericalError

F64 = torch.float64

#: Relative floor added to Sigma (times its mean diagonal) by the iterative solvers, see
#: :func:`prepare_sigma`.
EPS_REL = 1e-10

#: The damping rule, relative to ``mean(diag(Sigma))``: every solver but the Sigma-SVD fits
#: ``trace((W - W~) (Sigma + DAMPING * mean(diag(Sigma)) * I) (W - W~)^T)`` unless told
#: otherwise; see :func:`default_damping`.
DAMPING = 1e-3

#: ``||W~||_F / ||W||_F`` above which :func:`norm_growth_warning` warns.
NORM_GROWTH_WARN = 2.0

#: An error written as ``base - 2 cross + quad`` is recomputed from the explicit residual when it
#: falls below this fraction of ``base + quad`` (cancellation would cost digits).
CANCEL = 1e-5


@contextlib.contextmanager
def serial_lapack(n: int, limit: int = 1024):
    """Run a dense factorisation of an ``n x n`` matrix single-threaded when ``n <= limit``.

    For such sizes threading gains little, and on a loaded machine (another process using the
    cores) OpenMP-threaded ``eigh`` was measured 10-100x slower than single-threaded.
    """
    nt = torch.get_num_threads()
    if n > limit or nt == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(nt)


def eigh(X: torch.Tensor):
    """``torch.linalg.eigh`` (ascending) of the symmetric part of ``X``, see :func:`serial_lapack`.

    LAPACK's divide-and-conquer driver occasionally fails to converge on large, very
    ill-conditioned covariances (seen on a 4608 x 4608 Sigma); then the relatively robust
    representations driver (scipy ``evr``) is used, and as a last resort a jitter of
    ``1e-12 * mean(diag)`` (far below any eigenvalue that matters for the objective).
    """
    X = 0.5 * (X + X.transpose(-1, -2))
    with serial_lapack(X.shape[-1]):
        try:
            return torch.linalg.eigh(X)
        except torch.linalg.LinAlgError:
            pass
    import numpy as np
    import scipy.linalg

    Xn = X.detach().cpu().to(torch.float64).numpy()
    if Xn.ndim != 2:
        outs = [eigh(torch.from_numpy(x)) for x in Xn]
        return (torch.stack([o[0] for o in outs]).to(X), torch.stack([o[1] for o in outs]).to(X))
    try:
        w, v = scipy.linalg.eigh(Xn, driver="evr")
    except np.linalg.LinAlgError:
        jitter = 1e-12 * float(np.mean(np.diag(Xn)) or 1.0)
        w, v = scipy.linalg.eigh(Xn + jitter * np.eye(len(Xn)), driver="evr")
    return torch.from_numpy(w).to(X), torch.from_numpy(v).to(X)


def qr(X: torch.Tensor):
    """Reduced QR, see :func:`serial_lapack`."""
    with serial_lapack(min(X.shape[-2:]) * 4):
        return torch.linalg.qr(X)



def check_finite(t: torch.Tensor, what: str, name: str | None) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"{layer_label(name)}: {what} contains NaN or Inf",
            hint="check the checkpoint and the calibration activations of this layer "
            "(run calibration again with anomaly checks, or exclude the layer)",
        )


def diverged(name: str | None, solver: str, detail: str) -> NumericalError:
    return NumericalError(
        f"{layer_label(name)}: {solver} diverged ({detail})",
        hint="try damping=1e-6 or a smaller rank, or solve this layer with norm 'frobenius' "
        "to check the weight itself",
    )


def resolve_device_dtype(weight: torch.Tensor, device, dtype) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else weight.device
    dt = dtype if dtype is not None else torch.float32
    if dt not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be torch.float32 or torch.float64, got {dt}",
                         hint="pass dtype=torch.float32 (fast) or torch.float64 (exact)")
    return dev, dt


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise InputError(f"weight must have at least 2 dims, got shape {tuple(weight.shape)}",
                         hint="pass a Linear weight (T, D) or conv kernel (T, S, kh, kw)")
    return weight.reshape(weight.shape[0], -1)


def checked_sigma(sigma: torch.Tensor, D: int, device, name: str | None) -> torch.Tensor:
    """``sigma`` validated (shape ``(D, D)``, finite) as a symmetric float64 tensor on ``device``."""
    if sigma.shape != (D, D):
        raise InputError(f"{layer_label(name)}: sigma has shape {tuple(sigma.shape)}, expected ({D}, {D})",
                         hint="sigma must be the covariance of the unfolded layer input (D = S*kh*kw)")
    check_finite(sigma, "sigma", name)
    s = sigma.to(device=device, dtype=F64)
    return 0.5 * (s + s.T)


def damp(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    """``Sigma + damping * mean(diag(Sigma)) * I``, per group for a ``(g, D, D)`` stack: the one
    damping rule of every solver (``damping = 0`` returns ``sigma`` itself)."""
    if not damping:
        return sigma
    md = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    return sigma + damping * md[..., None, None] * eye


def prepare_sigma(sigma: torch.Tensor | None, D: int, *, damping: float, eps_rel: float,
                  device: torch.device, name: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return ``(sigma_obj, sigma_solve)`` in float64 on ``device`` (both ``None`` for Frobenius).

    ``sigma_obj = Sigma + damping * mean(diag) * I`` is the objective every reported error uses.
    ``sigma_solve = sigma_obj + eps_rel * mean(diag) * I`` is what the iterative solvers factor
    and invert.  Why the floor does not matter: a singular Sigma (dead ReLU channels, zero padding)
    has directions that carry no input energy; changing ``W~`` along them does not change the
    objective, so the problem has no unique solution there.  The floor selects the minimum-norm
    one and changes the objective by at most ``eps_rel * mean(diag) * ||W - W~||_F^2``, i.e. by a
    relative ``~1e-10`` on the error of any sensible approximation, far below float32 rounding.
    Results are therefore the same for any floor in ``[1e-13, 1e-8]`` (tested).  The Sigma-SVD
    does not use the floor at all (its closed form only needs ``W Sigma W^T``).
    """
    if sigma is None:
        return None, None
    s = checked_sigma(sigma, D, device, name)
    md = float(torch.diagonal(s).mean())
    if md <= 0:
        raise InputError(f"{layer_label(name)}: sigma has zero trace (the layer never saw any input energy)",
                         hint="check the calibration store for this layer, or use norm 'frobenius'")
    s = damp(s, damping)
    s_solve = s + eps_rel * md * torch.eye(D, dtype=F64, device=device)
    return s, s_solve


def spd_solve(G: torch.Tensor, rhs: torch.Tensor, right: bool = False) -> torch.Tensor:
    """Solve ``G X = rhs`` (or ``X G = rhs`` if ``right``) for symmetric PSD ``G`` in float64.

    Cholesky; if ``G`` is numerically singular, retry with a growing jitter (relative to its mean
    diagonal), which yields the regularised minimum-norm solution.
    """
    G = G.to(F64)
    G = 0.5 * (G + G.T)
    rhs64 = rhs.to(F64)
    n = G.shape[0]
    md = float(torch.diagonal(G).mean().abs()) or 1.0
    eye = torch.eye(n, dtype=F64, device=G.device)
    jitter = 0.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(G + jitter * md * eye)
        if int(info) == 0:
            if right:
                X = torch.cholesky_solve(rhs64.T, L).T
            else:
                X = torch.cholesky_solve(rhs64, L)
            if bool(torch.isfinite(X).all()):
                return X
        jitter = 1e-13 if jitter == 0.0 else jitter * 100
    # last resort: eigen-pseudo-inverse
    w, V = eigh(G)
    winv = torch.where(w > w.max() * 1e-12, 1.0 / w, torch.zeros_like(w))
    Ginv = (V * winv) @ V.T
    return rhs64 @ Ginv if right else Ginv @ rhs64


def top_eigvecs(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a symmetric PSD matrix (float64), descending."""
    X = X.to(F64)
    w, V = eigh(0.5 * (X + X.T))
    w = w.flip(0)[:k]
    V = V.flip(1)[:, :k]
    return w, V


def top_left_singular(X: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` left singular vectors of ``X`` (float64, via the smaller Gram or an SVD)."""
    X = X.to(F64)
    if X.shape[0] <= X.shape[1]:
        return top_eigvecs(X @ X.T, k)[1]
    U, _, _ = torch.linalg.svd(X, full_matrices=False)
    return U[:, :k]


def frob_sq(x: torch.Tensor) -> float:
    return float((x.to(F64) ** 2).sum())


def sigma_error(dW: torch.Tensor, sigma: torch.Tensor | None, dtype: torch.dtype) -> float:
    """``trace(dW Sigma dW^T)`` from an explicit residual (float64 accumulation)."""
    if sigma is None:
        return frob_sq(dW)
    d = dW.to(dtype)
    return float(((d @ sigma.to(dtype)).to(F64) * dW.to(F64)).sum())


def pcg(op: Callable, b: torch.Tensor, x0: torch.Tensor,
        r0: torch.Tensor | None, precond: Callable[[torch.Tensor], torch.Tensor] | None,
        tol: float, max_iter: int, track: torch.Tensor | None = None,
        energy_tol: float = 0.0):
    """Preconditioned conjugate gradients on matrix unknowns ``op(X) = b`` (op SPD).

    ``r0 = b - op(x0)`` may be passed when already known (saves one operator application).
    Inner products accumulate in float64.  Every step decreases the quadratic energy, so a
    truncated solve still never increases the ALS objective.  Returns ``(x, steps)``.

    With ``track`` (= ``Lin(x0)`` for a linear map ``Lin``), ``op`` must return
    ``(op(p), Lin(p))`` and the result is ``(x, steps, Lin(x))`` (the image is updated along
    with ``x``, which saves recomputing it).

    ``energy_tol``: also stop once a step lowers the quadratic ``x^T op(x) - 2 b^T x`` (which is
    the solver objective up to a constant) by less than ``energy_tol`` (absolute).
    """
    x = x0.clone()
    tracked = track.clone() if track is not None else None
    if r0 is None:
        o = op(x0)
        r = b - (o[0] if track is not None else o)
    else:
        r = r0.clone()
    bnorm = math.sqrt(frob_sq(b)) or 1.0

    def out(steps):
        return (x, steps, tracked) if track is not None else (x, steps)

    if math.sqrt(frob_sq(r)) <= tol * bnorm:
        return out(0)
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = float((r.to(F64) * z.to(F64)).sum())
    steps = 0
    for steps in range(1, max_iter + 1):
        o = op(p)
        if track is not None:
            Ap, Lp = o
        else:
            Ap, Lp = o, None
        pAp = float((p.to(F64) * Ap.to(F64)).sum())
        if not pAp > 0:
            break
        alpha = rz / pAp
        x = x + alpha * p
        if tracked is not None:
            tracked = tracked + alpha * Lp
        r = r - alpha * Ap
        if math.sqrt(frob_sq(r)) <= tol * bnorm or alpha * rz < energy_tol:
            break
        z = precond(r) if precond is not None else r
        rz_new = float((r.to(F64) * z.to(F64)).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return out(steps)


def partial_traces(sigma: torch.Tensor, dims: tuple[int, ...], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker-type approximation of ``Sigma`` for mode ``k`` of the input index.

    The input index is ``(i_1, ..., i_m)`` with sizes ``dims`` (C order).  Returns ``(Sk, Srest)``
    with ``Sk`` (n_k x n_k) the partial trace over the other modes and ``Srest`` the partial trace
    over mode ``k`` (ordered like the other modes, C order), scaled so that
    ``Sigma ~ Sk (x) Srest`` (modulo the mode permutation).  Used only to precondition CG.
    """
    m = len(dims)
    S = sigma.reshape(*dims, *dims)
    # move mode k first on both sides
    perm = [k] + [i for i in range(m) if i != k]
    S = S.permute(*perm, *[m + i for i in perm])
    nk = dims[k]
    rest = math.prod(dims) // nk
    S = S.reshape(nk, rest, nk, rest)
    Sk = torch.einsum("aibi->ab", S)
    Srest = torch.einsum("aiaj->ij", S)
    tr = float(torch.diagonal(Sk).sum()) or 1.0
    return Sk / tr, Srest


@dataclass(frozen=True, kw_only=True)
class IterativeResult:
    """What every iterative solver's result records besides its factors.

    ``rel_error``: relative squared error of the returned factors (``history[-1]``);
    ``history``: the best error so far after each iteration (non-increasing); ``raw_history``:
    each iterate's error; ``n_iter``: iterations run; ``converged``: the relative decrease fell
    below ``tol``; ``seconds``: wall time; ``groups``: number of groups; ``info``: ``damping``,
    ``norm_ratio``, ``identity_error`` (:func:`fit_diagnostics`).
    """

    rel_error: float
    history: list = field(default_factory=list)
    raw_history: list = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    seconds: float = 0.0
    groups: int = 1
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GroupSplit:
    groups: int
    weights: list
    sigmas: list


def split_groups(weight: torch.Tensor, sigma: torch.Tensor | None, groups: int | None,
                 name: str | None) -> GroupSplit:
    """Split a grouped layer: group ``i`` owns output channels ``[i*T/g, (i+1)*T/g)`` and
    ``sigma[i]``.  ``groups`` is inferred from a 3-D ``sigma`` when not given."""
    if groups is None:
        groups = sigma.shape[0] if (sigma is not None and sigma.dim() == 3) else 1
    g = int(groups)
    T = weight.shape[0]
    if g < 1 or T % g:
        raise InputError(f"{layer_label(name)}: {T} output channels cannot be split into {g} groups",
                         hint="pass the layer's groups value")
    ws = list(weight.reshape(g, T // g, *weight.shape[1:]).unbind(0))
    if sigma is None:
        ss = [None] * g
    elif sigma.dim() == 3:
        if sigma.shape[0] != g:
            raise InputError(f"{layer_label(name)}: sigma has {sigma.shape[0]} groups, expected {g}",
                             hint="sigma for a grouped conv has shape (groups, D_g, D_g)")
        ss = list(sigma.unbind(0))
    elif g == 1:
        ss = [sigma]
    else:
        raise InputError(f"{layer_label(name)}: groups={g} needs a sigma of shape (g, D_g, D_g), "
                         f"got {tuple(sigma.shape)}", hint="pass one covariance per group")
    return GroupSplit(g, ws, ss)


def combine_histories(hists: list[list[float]], bases: list[float]) -> list[float]:
    """Relative error of a grouped layer per iteration: ``sum_i err_i / sum_i base_i`` (groups
    that stopped early keep their last value)."""
    n = max(len(h) for h in hists)
    total = sum(bases) or 1.0
    out = []
    for it in range(n):
        out.append(sum(b * (h[min(it, len(h) - 1)]) for h, b in zip(hists, bases)) / total)
    return out


class BestIterate:
    """Bookkeeping shared by the ALS solvers: keep the best iterate, a non-increasing history,
    and stop on a relative decrease below ``tol``, an exact fit, or ``max_iter``.

    ``step(rel, it, snapshot)`` records the relative error of iteration ``it`` (``snapshot()``
    copies the iterate when it is the best so far) and returns True when the loop should stop.
    """

    def __init__(self, tol: float, max_iter: int, name: str | None, solver: str):
        self.tol, self.max_iter, self.name, self.solver = tol, max_iter, name, solver
        self.history: list[float] = []
        self.raw: list[float] = []
        self.best_error: float | None = None
        self.best = None
        self.converged = False

    def step(self, rel: float, it: int, snapshot: Callable) -> bool:
        if not math.isfinite(rel):
            raise diverged(self.name, self.solver, f"error {rel} at iteration {it}")
        self.raw.append(rel)
        if self.best_error is None or rel <= self.best_error:
            self.best_error, self.best = rel, snapshot()
        self.history.append(self.best_error)
        h = self.history
        if len(h) > 1 and (h[-2] - h[-1]) <= self.tol * h[-2]:
            self.converged = True
            return True
        if rel <= 1e-15 or it == self.max_iter:
            self.converged = rel <= 1e-15
            return True
        return False


# ----------------------------------------------------------------------------- damping rule


def default_damping(method: str) -> float:
    """The damping a solver applies by default, relative to ``mean(diag(Sigma))``.

    ``0`` for the Sigma-SVD (``method='svd'``): its closed form ``W~ = U U^T W`` projects ``W``,
    so it cannot grow along directions the data never excites.  :data:`DAMPING` (``1e-3``) for
    every other method (``tucker2``, ``cp3`` / ``cp4``, their ``-stable`` variants, ``lrs``,
    ``sparse``): their factors are solved from the normal equations of Sigma, which leave those
    directions free, and undamped fits grew the weights several times over (see
    :func:`fit_diagnostics`).  The solvers' ``damping`` defaults and
    :meth:`ddtd.methods.MethodConfig.damping_for` both come from here.
    """
    return 0.0 if method == "svd" else DAMPING


# ----------------------------------------------------------------------------- exact errors


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back to float64: the value a returned factor will have."""
    return x.to(dtype).to(F64)


def error_from_terms(base: float, cross: float, quad: float, residual: Callable[[], float]) -> float:
    """``trace(dW S dW^T) = base - 2 cross + quad`` with ``base = trace(W S W^T)``,
    ``cross = trace(W~ S W^T)``, ``quad = trace(W~ S W~^T)`` (float64 terms).

    When the result is below :data:`CANCEL` times ``base + quad`` the subtraction has lost too
    many digits and ``residual()`` (the error from the explicit residual) is returned instead.
    """
    err = base - 2.0 * cross + quad
    if not err >= CANCEL * (abs(base) + abs(quad)):
        err = residual()
    return max(float(err), 0.0)


# ----------------------------------------------------------------------------- diagnostics


def _as_rows(x: torch.Tensor, T: int) -> torch.Tensor:
    return x.reshape(T, -1).to(F64)


def fit_diagnostics(weight: torch.Tensor, approx: torch.Tensor,
                    sigma: torch.Tensor | None = None) -> dict:
    """How far a fit strayed from the weight outside the metric it was fitted in.

    Args:
        weight: ``W``, ``(T, D)`` or a conv kernel ``(T, S/g, kh, kw)``.
        approx: ``W~`` with ``T * D`` elements in the same order (a grouped result's
            ``(g, T/g, ...)`` stack included).
        sigma: optional ``(D, D)`` or ``(g, D_g, D_g)`` metric (rows of group ``i`` are
            ``[i T/g, (i+1) T/g)``).

    Returns:
        ``{"norm_ratio": ||W~||_F / ||W||_F, "identity_error": ||W - W~||_F / ||W||_F}``
        (the relative Frobenius error, i.e. the error with Sigma replaced by the identity; not
        squared), plus ``"sigma_error"`` (relative squared, ``sum_g trace(dW_g S_g dW_g^T) /
        sum_g trace(W_g S_g W_g^T)``) when ``sigma`` is given.  A Sigma fit reproduces ``W``
        only on the directions the data excites; a ``norm_ratio`` well above 1 means the rest
        of ``W~`` grew, which amplifies inputs unlike the calibration set.
    """
    T = weight.shape[0]
    W = _as_rows(weight, T)
    A = _as_rows(approx, T).to(W.device)  # the fit may live on another device (device=)
    if A.shape != W.shape:
        raise InputError(f"approx has {approx.numel()} elements, the weight {weight.numel()}",
                         hint="pass W~ in the weight's layout")
    nw = float(W.norm())
    out = {"norm_ratio": float(A.norm()) / nw if nw > 0 else math.inf,
           "identity_error": float((W - A).norm()) / nw if nw > 0 else math.inf}
    if sigma is not None:
        s = sigma.to(W.device, F64)
        s3 = s if s.dim() == 3 else s[None]
        g = s3.shape[0]
        Wg, Eg = W.reshape(g, T // g, -1), (W - A).reshape(g, T // g, -1)
        num = float(torch.einsum("gtd,gde,gte->", Eg, s3, Eg))
        den = float(torch.einsum("gtd,gde,gte->", Wg, s3, Wg))
        out["sigma_error"] = num / den if den > 0 else 0.0
    return out


def norm_growth_warning(info: dict, name: str | None = None,
                        threshold: float = NORM_GROWTH_WARN) -> str | None:
    """A warning message when a fit's ``info["norm_ratio"]`` exceeds ``threshold``, else ``None``.

    ``info``: a solver result's ``info`` (or a report row's); rows without a norm ratio give
    ``None``.  Meant for the caller's logger: ``msg = norm_growth_warning(res.info, name)``.
    """
    ratio = (info or {}).get("norm_ratio")
    if ratio is None or not ratio > threshold:
        return None
    damping = (info or {}).get("damping")
    dm = f" (damping {damping:g})" if damping is not None else ""
    return (f"{layer_label(name)}: the fitted weights have {ratio:.3g}x the Frobenius norm of the "
            f"original{dm}, above {threshold:g}x: the fit is loose along input directions the "
            "calibration data barely excites; use the default damping "
            f"({DAMPING:g}) or larger, or more calibration images")
