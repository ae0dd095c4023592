"""Sequential fitting: fit a layer on the inputs the already-compressed layers before it produce.

With original inputs ``x`` and compressed-model inputs ``x~`` (centred moments), the objective
``E||W x + b - W~ x~ - b~||^2`` splits as ``E||W x - W' x~||^2 + E||(W' - W~) x~||^2`` with
``W' = W C_{x x~} C_{x~ x~}^+``: the ordinary problem for the target ``W'`` in the ``C_{x~ x~}``
metric, for every format (:func:`regression_target`, :func:`cross_moments`).

Sequential fitting regresses on ``C_{x~ x~}``; with few inputs per input dimension it overfits.
In ``"auto"`` mode :func:`decide` therefore fits an svd probe both ways on part of the
calibration inputs and keeps sequential fitting for a layer only when it lowers the output
error on the held-out rest by more than :data:`SEQUENTIAL_Z` standard errors of the per-input
difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import InputCapture
from .calibration.moments import conv_geometry, conv_input_moments, linear_input_moments
from .errors import InputError
from .fitting import LayerData, solve
from .inputs import Feed, count, rebatch, take
from .inputs import batch_size as samples_in
from .layers import build as build_layer
from .methods import SvdConfig
from .solvers import eigh

__all__ = ["SequentialDecision", "decide", "capture", "cross_moments", "regression_target", "support_eigh", "mode_for",
           "paired_z", "split_holdout", "SEQUENTIAL_Z", "SEQUENTIAL_IMAGES"]

#: ``"auto"`` keeps a layer sequential only when the held-out output error of the sequential
#: probe is lower by at least this many standard errors of the per-input difference.
SEQUENTIAL_Z = 3.0
#: ``"auto"`` decides (and fits a sequential layer) on at most this many calibration inputs:
#: each decision runs the model up to the layer twice over them.
SEQUENTIAL_IMAGES = 128


@dataclass
class SequentialDecision:
    """Whether a layer is fitted sequentially, the held-out errors behind the choice (``info``:
    ``{"heldout_error": {original_inputs, sequential, z}}``) and, when it is, the data to fit it
    against."""

    sequential: bool
    info: dict = field(default_factory=dict)
    data: LayerData | None = None


def mode_for(sequential: str, have_inputs: bool, norm: str) -> str:
    """The mode in effect: ``"auto"`` only with calibration inputs and the Sigma norm (the
    Frobenius baseline uses no data unless asked); ``"on"`` needs the inputs."""
    if sequential == "auto":
        return "auto" if have_inputs and norm == "sigma" else "off"
    if sequential == "on" and not have_inputs:
        raise InputError("sequential fitting needs the calibration images, not only a store",
                         hint="pass data (images) too, or sequential='off'")
    return sequential


def capture(model: nn.Module, name: str, batches, feed: Feed) -> list[torch.Tensor]:
    """The inputs of layer ``name`` for every batch (the forward pass stops right after it; a
    Linear layer's ``(B, L, d)`` inputs as the rows of the positions the token mask marks)."""
    return InputCapture(model, [name], forward=feed.forward, mask=feed.mask).run(batches, feed.device)[name]


def cross_moments(layer: nn.Module, xs: list[torch.Tensor], xts: list[torch.Tensor], *, with_xx: bool = False):
    """Centred ``C_{x~x~}``, ``C_{x x~}`` and the means of ``x`` and ``x~`` over all batches
    (and, with ``with_xx``, the centred ``C_{xx}`` of the original inputs as a fifth value)."""
    if isinstance(layer, nn.Conv2d):
        geo = conv_geometry(layer)
        moments = lambda a, y=None: conv_input_moments(a, geo, y=y)  # noqa: E731
    else:
        moments = linear_input_moments
    acc: dict = {}
    for x, xt in zip(xs, xts):
        tt, t_sum, n = moments(xt)
        xt_cross, x_sum, _ = moments(x, y=xt)
        parts = [("tt", tt), ("t", t_sum), ("xt", xt_cross), ("x", x_sum)]
        if with_xx:
            parts.append(("xx", moments(x)[0]))
        for k, v in parts:
            acc[k] = acc.get(k, 0) + v.to(torch.float64)
        acc["n"] = acc.get("n", 0) + n
    n = acc["n"]
    mu_t, mu_x = acc["t"] / n, acc["x"] / n
    c_tt = acc["tt"] / n - mu_t.unsqueeze(-1) * mu_t.unsqueeze(-2)
    c_xt = acc["xt"] / n - mu_x.unsqueeze(-1) * mu_t.unsqueeze(-2)
    if with_xx:
        return c_tt, c_xt, mu_x, mu_t, acc["xx"] / n - mu_x.unsqueeze(-1) * mu_x.unsqueeze(-2)
    return c_tt, c_xt, mu_x, mu_t


def regression_target(W: torch.Tensor, c_tt: torch.Tensor, c_xt: torch.Tensor, eps_rel: float = 1e-10):
    """``W' = W C_{x x~} C_{x~ x~}^+ + W (I - P)`` per group, ``P`` the projector onto the
    directions ``x~`` visits: among the optimal regressions, the one closest to ``W`` (it keeps
    the original weights where the calibration data says nothing).

    ``C_{x~ x~}`` is decomposed on its support only (:func:`support_eigh`): the input
    coordinates that are always zero (patch entries that only ever meet zero padding, e.g. the
    eight outer taps of a 3x3 conv on a 1x1 map) have zero rows and columns, contribute zero
    eigenvalues, which the ``eps_rel`` cut drops, and nothing to ``P``."""
    g = c_tt.shape[0]
    Wg = W.to(torch.float64).reshape(g, W.shape[0] // g, -1)
    out = []
    for i in range(g):
        ev, v, idx = support_eigh(c_tt[i])
        keep = ev > eps_rel * (ev.max() if ev.numel() else ev.new_zeros(())).clamp_min(1e-300)
        vk = v[:, keep]  # the kept eigenvectors, on the support
        w = Wg[i].clone()
        w[:, idx] += ((Wg[i] @ c_xt[i][:, idx] @ vk) / ev[keep] - Wg[i][:, idx] @ vk) @ vk.T
        out.append(w)
    return torch.cat(out).reshape(W.shape).to(W.dtype)


def support_eigh(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecomposition of the symmetric ``(D, D)`` matrix ``c`` on its support ``idx``, the
    ``k`` coordinates whose row or column is not all zero: ``(eigenvalues (k,) ascending, eigenvectors
    (k, k) over those coordinates, idx)``. The other ``D - k`` eigenpairs (eigenvalue 0, the unit
    vectors of the zero coordinates) are left out: one ``k x k`` eigendecomposition instead of a
    ``D x D`` one."""
    nonzero = c != 0
    idx = (nonzero.any(dim=1) | nonzero.any(dim=0)).nonzero().squeeze(1)
    if not idx.numel():
        return c.new_zeros(0), c.new_zeros(0, 0), idx
    if idx.numel() == c.shape[0]:
        return (*eigh(c), idx)
    return (*eigh(c[idx][:, idx]), idx)


def sequential_data(layer: nn.Module, xs, xts) -> LayerData:
    """What a layer is fitted against sequentially: ``C_{x~x~}``, the target ``W'`` and both means."""
    c_tt, c_xt, mu_x, mu_t = cross_moments(layer, xs, xts)
    return LayerData(c_tt, mu_t, target=regression_target(layer.weight.detach(), c_tt, c_xt), mean_in=mu_x)


def split_holdout(batches, batch_size: int, fraction: float = 0.25):
    """The inputs split into a fitting part and a held-out part (the last ``fraction`` of the
    samples), each in batches of ``batch_size`` where the batches are plain tensors."""
    n = count(batches)
    n_h = max(1, int(round(n * fraction)))
    if n - n_h < 1:
        return batches, None
    fit, held, seen = [], [], 0
    for b in batches:
        s = samples_in(b)
        cut = min(max(n - n_h - seen, 0), s)
        if cut:
            fit.append(b if cut == s else take(b, slice(0, cut)))
        if cut < s:
            held.append(b if cut == 0 else take(b, slice(cut, s)))
        seen += s
    return rebatch(fit, batch_size), rebatch(held, batch_size)


def paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Paired t statistic of ``a - b`` (shape ``(n,)`` each): ``mean(d) / (sd(d) / sqrt(n))``
    with the unbiased ``sd``; > 0 when ``b`` is lower. 0 when it is undefined (n < 2, or no
    difference at all)."""
    d = (a - b).double()
    if d.numel() < 2:
        return 0.0
    se = float(d.std()) / math.sqrt(d.numel())
    m = float(d.mean())
    return 0.0 if m == 0.0 else (math.copysign(math.inf, m) if se == 0.0 else m / se)


@torch.no_grad()
def decide(name: str, layer: nn.Module, models: tuple[nn.Module, nn.Module], parts: tuple, svd_ranks,
           feed: Feed) -> SequentialDecision:
    """Fit an svd probe at ``svd_ranks`` both ways on the fitting inputs ``parts[0]`` - on the
    original inputs (``models[0]``, the reference) and on those the compressed layers before it
    produce (``models[1]``) - and compare their output errors ``e_i = ||W x_i + b - W~ x~_i - b~||^2``
    per held-out input (``parts[1]``; per token for a Linear layer on token sequences). Sequential wins only when ``d_i = e_i(original) -
    e_i(sequential)`` has ``z = mean(d) / (sd(d) / sqrt(n)) > SEQUENTIAL_Z``; otherwise the plain
    fit, which cannot overfit the compressed inputs. When it wins, ``data`` is the sequential
    fit's data on all those inputs."""
    fit_b, held_b = parts
    if held_b is None:
        return SequentialDecision(False)
    n_fit = len(fit_b)
    xs = capture(models[0], name, fit_b + held_b, feed)  # one pass each for both parts
    xts = capture(models[1], name, fit_b + held_b, feed)
    device = feed.device
    if all(torch.equal(a, b) for a, b in zip(xs, xts)):
        return SequentialDecision(False)  # nothing upstream was changed: both ways are the same fit
    c_tt, c_xt, mu_x, mu_t, c_xx = cross_moments(layer, xs[:n_fit], xts[:n_fit], with_xx=True)
    cfg = SvdConfig()
    plain = solve(layer, cfg, svd_ranks, LayerData(c_xx.to(device), mu_x.to(device)), name=name)
    seq = solve(layer, cfg, svd_ranks, LayerData(c_tt.to(device), mu_t.to(device),
                                                 target=regression_target(layer.weight.detach(), c_tt, c_xt),
                                                 mean_in=mu_x.to(device)), name=name)
    per_input = []
    for fit in (plain, seq):
        cand = build_layer("svd", layer, fit.factors, fit.bias, name=name)
        per_input.append(torch.cat([(layer(x) - cand(xt)).pow(2).flatten(1).sum(1).double()
                                    for x, xt in zip(xs[n_fit:], xts[n_fit:])]))
    z = paired_z(per_input[0], per_input[1])
    info = {"heldout_error": {"original_inputs": float(per_input[0].sum()),
                              "sequential": float(per_input[1].sum()), "z": z}}
    if z <= SEQUENTIAL_Z:
        return SequentialDecision(False, info)
    return SequentialDecision(True, info, sequential_data(layer, xs, xts))
