"""Compress a model end to end: fold BN, calibrate, plan ranks, solve each layer, assemble.

The one call :func:`compress` is made of typed pieces that can be used alone:

* :func:`prepare` - copy the model and fold BatchNorm into the convs before it (the error that
  matters is the one after BN);
* :func:`ddtd.calibration.calibrate` - input moments per layer (or a store from disk);
* :func:`plan` - which layers, which method, which ranks;
* :func:`solve` - one layer: factors from its weight and (centred) covariance, with the bias
  moved to ``b + (W - W~) mu``;
* :func:`assemble` - swap the fitted chains in, by qualified name.

Objective per layer (``norm="sigma"``): ``min trace((W - W~) Sigma_c (W - W~)^T)`` with the
centred covariance ``Sigma_c``; the bias correction makes that the exact mean squared output
error on the calibration data. Sequential mode fits each layer on the inputs ``x~`` produced by
the already-compressed layers before it, against the original outputs:
``min E||W x + b - W~ x~ - b~||^2``. Since ``E||W x - W~ x~||^2 = E||W x - W' x~||^2 +
E||(W' - W~) x~||^2`` with ``W' = W C_{x x~} C_{x~ x~}^+`` (centred moments), that is the ordinary
problem for the target ``W'`` in the ``C_{x~ x~}`` metric, for every format.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .calibration import CovarianceStore, LayerMoments, calibrate, select_layers
from .calibration.moments import conv_geometry, conv_input_moments, linear_input_moments
from .errors import InputError
from .layers import (factorized_weight, fold_batchnorm, fold_records, get_module, macs_by_layer,
                     replace_layer)
from .layers import build as build_layer
from .solvers import eigh, norm_growth_warning
from .solvers.formats import rank_for_budget
from .methods import (AUTO_METHODS, METHODS, Fit, MethodConfig, applicable, get_method, layer_dims,
                      relative_sigma_error)
from .calibration.run import ZERO_VARIANCE, warn_zero_variance
from .checks import unsupported_layers
from .fidelity import Fidelity, HeldOut, SvdProbe, search_ratio
from .sensitivity import output_sensitivity
from .ranks import (ErrorBudget, LayerShape, Ratio, allocate, evbmf_rank, format_macs,
                    format_params, resolve_rank, whitened_spectrum)

__all__ = ["LayerPlan", "LayerReport", "Report", "CompressResult", "prepare", "plan", "solve", "assemble",
           "compress"]

log = logging.getLogger("ddtd")


@dataclass
class LayerPlan:
    """What to do with one layer: ``method`` ``None`` means leave it dense (``reason`` says why)."""

    name: str
    method: str | None
    ranks: Any = None
    candidates: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class LayerReport:
    name: str
    type: str
    method: str
    ranks: Any
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    sigma_error: float | None
    weight_error: float | None
    seconds: float
    note: str = ""
    info: dict = field(default_factory=dict)  # method extras: sensitivity before / after, nnz, bytes


@dataclass
class Report:
    """Per-layer table and totals of a compression (JSON-serialisable with :meth:`to_dict`)."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)  # held-out agreement / error, target, probe curve

    @property
    def ratio(self) -> float:
        return self.params_before / max(1, self.params_after)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"], d["macs_ratio"] = self.ratio, self.macs_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = {k: v for k, v in d.items() if k not in ("ratio", "macs_ratio")}
        d["layers"] = [LayerReport(**row) for row in d.get("layers", [])]
        return cls(**d)


def prepare(model: nn.Module) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` in eval mode with BatchNorm folded into the preceding convs.

    Returns the copy and the fold records (for the saved file). The original is not touched.
    """
    work = copy.deepcopy(model).eval()
    work, folded = fold_batchnorm(work, inplace=True)
    return work, fold_records(folded)


def _shape(layer: nn.Module, macs: int) -> LayerShape:
    T, S, kh, kw, g = layer_dims(layer)
    pos_out = max(1, macs // max(1, layer.weight.numel()))
    if isinstance(layer, nn.Conv2d):
        sh, sw = layer.stride
        pos_in = pos_out * sh * sw
    else:
        pos_in = pos_out
    return LayerShape(T=T, S=S, kh=kh, kw=kw, groups=g, pos_in=pos_in, pos_out=pos_out)


def _default_excluded(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The input layer and the final classifier stay dense unless asked for by name."""
    out = {}
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if convs:
        out[convs[0]] = "input layer (few channels, little to gain, sensitive)"
        last = convs[-1]
        if isinstance(get_module(model, last), nn.Linear):
            out[last] = "final classifier (a low rank here costs classes)"
    return {k: v for k, v in out.items() if k in names}


def plan(
    model: nn.Module,
    moments: dict[str, LayerMoments] | CovarianceStore,
    *,
    input_shape: tuple[int, ...],
    method: str = "auto",
    norm: str = "sigma",
    ratio: float | None = None,
    budget: str = "both",
    rank=None,
    ranks: dict[str, Any] | None = None,
    error: float | None = None,
    strategy: str = "global",
    layers: str | list[str] | None = None,
    include_first: bool = False,
    include_last: bool = False,
    weights: dict[str, torch.Tensor] | None = None,
    spectra: dict[str, torch.Tensor] | None = None,
) -> tuple[list[LayerPlan], dict[str, LayerShape], dict[str, int]]:
    """Decide method and ranks per layer. Exactly one of ``ratio``, ``rank``, ``ranks``,
    ``error`` or ``strategy="vbmf"`` sets the size.

    ``weights``: per-layer ``(T,)`` output-channel weights (:mod:`ddtd.sensitivity`): the global
    allocation then compares the layers' output-weighted Sigma errors, all in the unit of the
    model's loss (``None``: each layer's error relative to its own output energy). ``spectra``:
    precomputed spectra by layer name (:func:`ddtd.ranks.whitened_spectrum`, with the same
    weights), reused when given.

    Returns the plans (module order), the layer shapes and the dense multiply-adds per layer.
    """
    given = [x is not None for x in (ratio, rank, ranks, error)]
    if sum(given) > 1:
        raise InputError("give one of ratio, rank, ranks or error", hint="e.g. --ratio 4")
    if sum(given) == 0 and strategy != "vbmf":
        raise InputError("no size given", hint="pass --ratio R, --rank R, --ranks FILE, --error E or --strategy vbmf")
    if method != "auto":
        get_method(method)
    names = select_layers(model, layers)
    excluded = _default_excluded(model, names)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if include_first:
        excluded.pop(convs[0], None)
    if include_last:
        excluded.pop(convs[-1], None)
    for name in list(excluded):  # a layer named exactly in --layers is wanted
        if layers and _named_exactly(layers, name):
            excluded.pop(name)
    macs = macs_by_layer(model, (1, *input_shape))
    plans: list[LayerPlan] = []
    shapes: dict[str, LayerShape] = {}
    for name in names:
        layer = get_module(model, name)
        if name in excluded:
            plans.append(LayerPlan(name, None, reason=excluded[name]))
            continue
        if _kept_dense_depthwise(layer, method, rank):
            plans.append(LayerPlan(name, None, reason=DEPTHWISE_REASON))
            continue
        if name not in moments:
            raise InputError(
                f"layer '{name}' has no entry in the covariance store",
                hint="calibrate with --layers covering it (or a larger --max-dim), or exclude it with --layers",
            )
        cands = tuple(m for m in (_auto_candidates(budget) if method == "auto" else [method])
                      if applicable(m, layer)[0]
                      and not (method == "auto" and m == "lrs" and layer.weight.numel() > AUTO_LRS_MAX_WEIGHTS))
        if not cands and applicable("svd", layer)[0]:
            cands = ("svd",)  # conv-only formats (tucker2, cp) leave Linear and 1x1 layers to svd
        if not cands:
            plans.append(LayerPlan(name, None, reason=applicable(method, layer)[1]))
            continue
        if ranks is not None and name not in ranks:
            plans.append(LayerPlan(name, None, reason="not in the ranks file"))
            continue
        shapes[name] = _shape(layer, macs.get(name, layer.weight.numel()))
        plans.append(LayerPlan(name, cands[0], candidates=cands))
    active = {p.name: p for p in plans if p.method is not None}
    spectra = dict(spectra or {})
    if strategy in ("global", "vbmf") or error is not None or method == "auto":
        for name in active:
            if name in spectra:
                continue
            lm = moments[name]
            # inputs without variance say nothing about which outputs matter: size by the weights
            sigma = lm.covariance() if norm == "sigma" and lm.variance_fraction() >= ZERO_VARIANCE else None
            W = get_module(model, name).weight.detach().cpu()
            spectra[name] = whitened_spectrum(W, sigma, None if weights is None else weights.get(
                name, torch.full((W.shape[0],), UNREACHED_WEIGHT, dtype=torch.float64)))
    # Size the layers (svd is the yardstick format for auto: each layer gets a parameter budget,
    # every candidate is then fitted at that budget and the best one kept).
    fmts = {n: _yardstick(p.method if method != "auto" else "svd") for n, p in active.items()}
    if ratio is not None:
        total = (sum(p.numel() for p in model.parameters()) if budget in ("params", "both")
                 else sum(macs.values()))
        # output-weighted spectra are in one unit (the model's loss): compare them as they are
        w = None if weights is None else {n: 1.0 for n in active}
        sizes = allocate({n: shapes[n] for n in active}, fmts, ratio, total=total, budget=budget,
                         strategy=strategy, spectra=spectra, weights=w)
    else:
        sizes = {}
        for n in active:
            if strategy == "vbmf" and rank is None and ranks is None and error is None:
                spec = spectra[n]
                T, S, kh, kw, g = layer_dims(get_module(model, n))
                r = max(1, max(evbmf_rank(spec[i].clamp_min(0).sqrt().numpy(), (T // g, S * kh * kw))
                               for i in range(spec.shape[0])))
                req = _svd_budget_request(fmts[n], shapes[n], r)
            elif error is not None:
                req = ErrorBudget(error)
            elif ranks is not None:
                req = ranks[n]
            else:
                req = Ratio(rank) if isinstance(rank, float) else rank
            sizes[n] = resolve_rank(req, fmts[n], shapes[n], spectra.get(n), name=n)
    for p in plans:
        if p.method is None:
            continue
        r = sizes.get(p.name)
        if r is None and isinstance(rank, float) and method != "auto" and get_method(p.method).sizing == "budget" \
                and shapes[p.name].S == 1:
            # depthwise at an explicit per-layer ratio: no svd can shrink it, but low rank +
            # sparse / pruning can. (A whole-model --ratio leaves depthwise convs dense: measured
            # on MobileNet-v3-small, squeezing them too cost 10-30 points at 2-4x.)
            p.ranks = max(2, int(shapes[p.name].dense_params / rank))
        elif r is None:
            p.method, p.reason = None, "would not shrink at its allocated size"
        elif method != "auto" and get_method(p.method).sizing == "budget":
            p.ranks = format_params("svd", shapes[p.name], r)  # the bytes of that svd, in 4-byte units
        else:
            p.ranks = r
    return plans, shapes, macs


#: Output weight of a layer the backward pass never reaches (its output does not reach the
#: model's output): next to nothing, so the allocation takes from it first.
UNREACHED_WEIGHT = 1e-30

#: Why a depthwise conv stays dense (see :func:`_kept_dense_depthwise`).
DEPTHWISE_REASON = ("depthwise conv: one input channel per group, so no low-rank format is smaller "
                    "(kept dense; --rank F with --method lrs / sparse prunes it)")


def _kept_dense_depthwise(layer: nn.Module, method: str, rank) -> bool:
    """A depthwise conv (one input channel per group) stays dense unless a per-layer ratio asks a
    budget-sized method (low rank + sparse, pruning) to shrink it: a ``kh x kw`` filter per
    channel has no low-rank form, and squeezing depthwise convs by a whole-model ratio cost 10-30
    points of accuracy on MobileNet-v3-small at 2-4x."""
    if not (isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.in_channels == layer.groups):
        return False
    return not (isinstance(rank, float) and method != "auto" and get_method(method).sizing == "budget")


#: ``auto`` tries low rank + sparse only on layers up to this many weights: its exact sparse
#: solves grow as rows x nonzeros^3 per row (a 512 x 4608 conv takes minutes; measured).
AUTO_LRS_MAX_WEIGHTS = 1 << 20


#: What a whole-model ratio counts: ``both`` (default) parameters, with no layer allowed more
#: multiply-adds than its dense original; ``params`` parameters alone (bytes only: low rank +
#: sparse, which runs a dense layer, may be chosen); ``flops`` multiply-adds.
BUDGETS = ("both", "params", "flops")


def _auto_candidates(budget: str) -> tuple[str, ...]:
    """Methods ``auto`` compares; low-rank + sparse only when the budget is bytes alone (it
    saves bytes, not multiply-adds: it runs as a dense layer)."""
    return AUTO_METHODS + (("lrs",) if budget == "params" else ())


def _yardstick(method: str) -> str:
    """The format the rank allocation sizes ``method`` with: its own layer format, or svd for
    the budget-sized methods (which then get the bytes of that svd)."""
    m = get_method(method)
    return "svd" if m.sizing == "budget" else m.kind


def _named_exactly(layers, name):
    pats = layers.split(",") if isinstance(layers, str) else layers
    return name in [p.strip() for p in pats]


def _svd_budget_request(fmt, shape, r):
    """A rank found for the svd format, carried to ``fmt`` as the same parameter budget."""
    if fmt == "svd":
        return r
    return Ratio(max(1.0001, shape.dense_params / max(1, format_params("svd", shape, r))))


def _ranks_for_format(method: str, shape: LayerShape, svd_rank: int):
    """Ranks of ``method`` with (at most) the parameters of an svd of rank ``svd_rank`` (a
    budget-sized method gets that many 4-byte units)."""
    m = get_method(method)
    if m.sizing == "budget":
        return format_params("svd", shape, svd_rank)
    if m.kind == "svd":
        return svd_rank
    return resolve_rank(_svd_budget_request(m.kind, shape, svd_rank), m.kind, shape)


def layer_macs(method: str, shape: LayerShape, ranks) -> int:
    """Multiply-adds per image of a layer replaced by ``method`` (a low-rank + sparse layer runs
    its merged dense weight: the original layer's count)."""
    m = get_method(method)
    if m.kind == "lrs":
        return shape.dense_macs
    return format_macs(m.kind, shape, ranks)


def dense_weight(layer: nn.Module, method: str, factors: list, name: str | None = None) -> torch.Tensor:
    """The dense weight ``W~`` a method's factors represent, shaped like ``layer.weight``."""
    m = get_method(method)
    if m.kind == "lrs":
        return factors[0].kernel().reshape(layer.weight.shape)
    return factorized_weight(layer, m.kind, *factors, name=name)


def _split(t: torch.Tensor, g: int) -> torch.Tensor:
    return t.reshape(g, t.shape[0] // g, -1)


def solve(
    name: str,
    layer: nn.Module,
    method: str,
    ranks,
    cfg: MethodConfig,
    sigma_c: torch.Tensor,
    mean: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    mean_in: torch.Tensor | None = None,
    out_weights: torch.Tensor | None = None,
) -> dict:
    """Fit one layer. Pure tensor maths: returns factors, corrected bias and errors.

    Args:
        layer: the original layer (its weight ``W`` and bias ``b``).
        sigma_c: ``(g, D, D)`` centred covariance of the inputs the replacement will see.
        mean: ``(g, D)`` their mean.
        target: weight to fit instead of ``W`` (sequential mode: ``W'``), same shape.
        mean_in: ``(g, D)`` mean of the original inputs (sequential mode), for the bias.
        out_weights: ``(T,)`` output-channel weights ``D`` (:mod:`ddtd.sensitivity`): the
            objective becomes ``trace(D (W - W~) Sigma (W - W~)^T)``, solved by fitting
            ``D^{1/2} W`` and dividing the output factor's rows by ``D^{1/2}`` (formats whose first
            factor maps to the outputs: svd, tucker2, cp; ignored for the others). The reported
            ``sigma_error`` stays unweighted; ``info["weighted_error"]`` is the weighted one.

    Returns:
        dict with ``factors``, ``bias``, ``sigma_error`` (relative, centred, the fitted target),
        ``weight_error`` (``||W - W~||_F / ||W||_F``), ``history``, ``info`` (method extras).
    """
    W = layer.weight.detach()
    Wt = W if target is None else target
    g = sigma_c.shape[0]
    m = get_method(method)
    if m.sizing == "budget" and g > 1:
        cfg = _with_option(cfg, method, groups=g)
    scale = None
    if out_weights is not None and m.kind in ("svd", "tucker2", "cp3", "cp4"):
        scale = out_weights.to(Wt.device, torch.float64).sqrt()
        view = (-1,) + (1,) * (Wt.dim() - 1)
        fit = m.solve((Wt.to(torch.float64) * scale.view(view)).to(Wt.dtype),
                      sigma_c.to(torch.float64) if cfg.norm == "sigma" else None, ranks, cfg, name)
        fit = replace(fit, factors=[_divide_rows(fit.factors[0], scale.reshape(g, -1)), *fit.factors[1:]])
    else:
        fit = m.solve(Wt, sigma_c.to(torch.float64) if cfg.norm == "sigma" else None, ranks, cfg, name)
    factors, rel, history = fit.factors, fit.rel_error, fit.history
    W_new = dense_weight(layer, method, factors, name=name).to(torch.float64)
    sigma_error = relative_sigma_error(Wt, W_new, sigma_c.to(torch.float64))
    # Bias: b~ = b + W mu_in - W~ mu  (mu_in = mu when the inputs are the original ones).
    # The Frobenius baseline uses no data at all unless asked (cfg.bias_correction).
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(
        W.shape[0], dtype=torch.float64, device=W.device)
    mu_in = mean if mean_in is None else mean_in
    Wg, Wng = _split(W.to(torch.float64), g), _split(W_new, g)
    correct = cfg.bias_correction if cfg.bias_correction is not None else cfg.norm == "sigma"
    if correct:
        shift = torch.cat([Wg[i] @ mu_in[i].to(torch.float64) - Wng[i] @ mean[i].to(torch.float64)
                           for i in range(g)])
        bias = (b + shift).to(W.dtype)
    else:
        bias = layer.bias.detach().clone() if layer.bias is not None else None
    weight_error = float((W.to(torch.float64) - W_new.reshape(W.shape)).norm() / W.to(torch.float64).norm().clamp_min(1e-30))
    info = dict(fit.info)
    if scale is not None:
        view = (-1,) + (1,) * (W.dim() - 1)
        info["weighted_error"] = relative_sigma_error(Wt.to(torch.float64) * scale.view(view),
                                                      W_new.reshape(W.shape) * scale.view(view),
                                                      sigma_c.to(torch.float64))
    return {"factors": factors, "bias": bias, "sigma_error": sigma_error, "solver_error": rel,
            "weight_error": weight_error, "history": history, "info": info}


def _divide_rows(first, scale_g: torch.Tensor):
    """The output factor (rows = output channels; ``(T, r)``, ``(g, T_g, r)`` or a list of
    per-group ``(T_g, r)``) with row ``t`` of group ``i`` divided by ``scale_g[i, t]``."""
    if isinstance(first, torch.Tensor):
        rows = scale_g.unsqueeze(-1) if first.dim() == 3 else scale_g.reshape(-1, 1)
        return (first.to(torch.float64) / rows.to(first.device)).to(first.dtype)
    return [(f.to(torch.float64) / scale_g[i].unsqueeze(-1).to(f.device)).to(f.dtype) for i, f in enumerate(first)]


def _with_option(cfg: MethodConfig, method: str, **kw) -> MethodConfig:
    opts = dict(cfg.options)
    opts[method] = {**opts.get(method, {}), **kw}
    return replace(cfg, options=opts)


def assemble(model: nn.Module, fits: dict[str, tuple[str, list, torch.Tensor | None]]) -> list[dict]:
    """Swap fitted layers into ``model`` (in place) by qualified name.

    ``fits`` maps a layer name to ``(method, factors, bias)`` as returned by :func:`solve`; each
    layer becomes a plain ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.Linear`` (low-rank + sparse:
    a :class:`ddtd.layers.LowRankSparse`). Returns the replacement records that
    :func:`ddtd.model_io.load_model` replays on a fresh architecture.
    """
    return [replace_layer(model, name, get_method(m).kind, factors, bias)
            for name, (m, factors, bias) in fits.items()]


def _macs_after(work: nn.Module, input_shape, report: Report) -> int:
    """Multiply-adds of the compressed model, measured by hooks; a low-rank + sparse layer runs
    one conv / linear with its merged weight (no hooked sub-module), so it counts as its
    original layer."""
    measured = macs_by_layer(work, (1, *input_shape))
    sparse_rows = [r for r in report.layers if r.method in METHODS and METHODS[r.method].kind == "lrs"]
    names = [r.name for r in sparse_rows]
    total = sum(v for k, v in measured.items() if not any(k == n or k.startswith(n + ".") for n in names))
    return total + sum(r.macs_after for r in sparse_rows)


def stored_units(module: nn.Module, *, exclude_bias: bool = False) -> int:
    """Stored numbers of ``module``: its parameters plus the int32 index buffers of sparse
    parts (one 4-byte unit each), so low-rank + sparse layers are counted honestly against
    dense and factorized ones."""
    n = sum(q.numel() for k, q in module.named_parameters() if not (exclude_bias and k.endswith("bias")))
    n += sum(b.numel() for k, b in module.named_buffers() if k == "index" or k.endswith(".index"))
    return n


class _Stop(Exception):
    pass


def _capture_inputs(model: nn.Module, name: str, batches, device) -> list[torch.Tensor]:
    """Inputs of layer ``name`` for every batch (forward stops right after it)."""
    layer = get_module(model, name)
    out: list[torch.Tensor] = []

    def hook(_m, inputs):
        out.append(inputs[0].detach())
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    model(x.to(device))
                except _Stop:
                    pass
    finally:
        h.remove()
    return out


def _cross_moments(layer: nn.Module, xs: list[torch.Tensor], xts: list[torch.Tensor], *, with_xx: bool = False):
    """Centred ``C_{x~x~}``, ``C_{x x~}`` and the means of ``x`` and ``x~`` over all batches
    (and, with ``with_xx``, the centred ``C_{xx}`` of the original inputs as a fifth value)."""
    if isinstance(layer, nn.Conv2d):
        geo = conv_geometry(layer)
        moments = lambda a, y=None: conv_input_moments(a, geo, y=y)  # noqa: E731
    else:
        moments = linear_input_moments
    acc = {}
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


def _regression_target(W: torch.Tensor, c_tt: torch.Tensor, c_xt: torch.Tensor, eps_rel: float = 1e-10):
    """``W' = W C_{x x~} C_{x~ x~}^+ + W (I - P)`` per group, ``P`` the projector onto the
    directions ``x~`` visits: among the optimal regressions, the one closest to ``W`` (it keeps
    the original weights where the calibration data says nothing)."""
    g = c_tt.shape[0]
    Wg = _split(W.to(torch.float64), g)
    out = []
    for i in range(g):
        ev, V = eigh(c_tt[i])
        keep = ev > eps_rel * ev.max().clamp_min(1e-300)
        Vk = V[:, keep]
        pinv = (Vk / ev[keep]) @ Vk.T
        out.append(Wg[i] @ c_xt[i] @ pinv + Wg[i] - (Wg[i] @ Vk) @ Vk.T)
    return torch.cat(out).reshape(W.shape).to(W.dtype)


def _sequential_mode(sequential, batches, norm: str) -> str:
    """``"on"``, ``"off"`` or ``"auto"`` (the default with the Sigma norm when calibration images
    are at hand; the Frobenius baseline uses no data unless asked)."""
    if sequential is None or sequential == "auto":
        return "auto" if batches is not None and norm == "sigma" else "off"
    if sequential in (True, "on"):
        if batches is None:
            raise InputError("sequential fitting needs the calibration images, not only a store",
                             hint="pass data (images) too, or sequential=False")
        return "on"
    if sequential in (False, "off"):
        return "off"
    raise InputError(f"sequential must be True, False or 'auto', got {sequential!r}")


#: ``sequential="auto"`` decides (and fits a sequential layer) on at most this many calibration
#: images: each decision runs the model up to the layer twice over them.
SEQUENTIAL_IMAGES = 128


def _first_images(batches, n: int, batch_size: int):
    """The first ``n`` inputs of ``batches`` (already a seeded random sample), re-batched."""
    x = torch.cat(batches)
    return list(x[:n].split(batch_size)) if len(x) > n else batches


def _split_holdout(batches, batch_size: int, fraction: float = 0.25):
    """The calibration images split into a fitting part and a held-out part (the last quarter)."""
    x = torch.cat(batches)
    n_h = max(1, int(round(len(x) * fraction)))
    if len(x) - n_h < 1:
        return batches, None
    fit, held = x[:-n_h], x[-n_h:]
    return list(fit.split(batch_size)), list(held.split(batch_size))


def _holdout_moments(work: nn.Module, batches, batch_size: int) -> dict:
    """Per layer ``(Sigma_fit, Sigma_held)``: centred covariances of three quarters of the
    calibration images and of the held-out quarter (for choices that in-sample errors would
    bias, like the rank / nonzeros split of low rank + sparse)."""
    fit_b, held_b = _split_holdout(batches, batch_size)
    if held_b is None:
        return {}
    a = calibrate(work, torch.cat(fit_b), batch_size=batch_size, show_progress=False,
                  check_variance=False).moments
    b = calibrate(work, torch.cat(held_b), batch_size=batch_size, show_progress=False,
                  check_variance=False).moments
    return {n: (a[n].covariance(), b[n].covariance()) for n in a if n in b}


def _probe_ranks(p: LayerPlan, shape: LayerShape):
    """svd ranks with (at most) the size planned for the layer: the cheap probe of the
    sequential decision."""
    m = get_method(p.method)
    if m.kind == "svd" and m.sizing == "ranks":
        return p.ranks
    size = int(p.ranks) if m.sizing == "budget" else format_params(m.kind, shape, p.ranks)
    g = shape.groups
    return rank_for_budget("svd", shape.T // g, shape.S, shape.kh, shape.kw, size / g)


#: ``sequential="auto"`` fits a layer sequentially only when the held-out output error of the
#: sequential probe is lower by at least this many standard errors of the per-image difference.
SEQUENTIAL_Z = 3.0


def _paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
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
def _choose_sequential(p, layer, reference, work, fit_b, held_b, shapes, cfg, dev):
    """Per layer: fit an svd probe (the planned size) both ways on the fitting images - on the
    original inputs, and sequentially on the inputs the compressed layers before it produce -
    and compare their output errors ``e_i = ||W x_i + b - W~ x~_i - b~||^2`` per held-out image.
    Sequential is kept only when the mean difference ``d_i = e_i(original) - e_i(sequential)``
    is more than ``SEQUENTIAL_Z`` standard errors above zero, ``z = mean(d) / (sd(d) / sqrt(n))``;
    otherwise the plain fit, which cannot overfit the compressed inputs. (Sequential fitting
    regresses on ``C_{x~x~}``; with few images per input dimension it overfits, which the
    held-out error exposes.) Returns the decision, ``{"heldout_error": {original_inputs,
    sequential (summed errors), z}}`` and, when sequential wins, the captured inputs of all the
    images it used ``(xs, xts)`` for the sequential fit itself."""
    if held_b is None:
        return False, {}, None
    n_fit = len(fit_b)
    xs = _capture_inputs(reference, p.name, fit_b + held_b, dev)  # one pass each for both parts
    xts = _capture_inputs(work, p.name, fit_b + held_b, dev)
    if all(torch.equal(a, b) for a, b in zip(xs, xts)):
        return False, {}, None  # nothing upstream was changed: both ways are the same fit
    xs_f, xts_f, xs_h, xts_h = xs[:n_fit], xts[:n_fit], xs[n_fit:], xts[n_fit:]
    r = _probe_ranks(p, shapes[p.name])
    c_tt, c_xt, mu_x, mu_t, c_xx = _cross_moments(layer, xs_f, xts_f, with_xx=True)
    del xs_f, xts_f
    plain = solve(p.name, layer, "svd", r, cfg, c_xx.to(dev), mu_x.to(dev))
    seq = solve(p.name, layer, "svd", r, cfg, c_tt.to(dev), mu_t.to(dev),
                target=_regression_target(layer.weight.detach(), c_tt, c_xt), mean_in=mu_x.to(dev))
    per_image = []
    for out in (plain, seq):
        cand = build_layer("svd", layer, out["factors"], out["bias"], name=p.name)
        per_image.append(torch.cat([(layer(x) - cand(xt)).pow(2).flatten(1).sum(1).double()
                                    for x, xt in zip(xs_h, xts_h)]))  # (n,) errors per image
    z = _paired_z(per_image[0], per_image[1])
    use = z > SEQUENTIAL_Z
    info = {"heldout_error": {"original_inputs": float(per_image[0].sum()),
                              "sequential": float(per_image[1].sum()), "z": z}}
    return use, info, ((xs, xts) if use else None)


@dataclass
class CompressResult:
    model: nn.Module
    report: Report
    records: list[dict]


def _check_request(model: nn.Module, *, ratio, rank, error, budget, strategy, method, norm, device) -> None:
    """Refuse an impossible request before any work (calibration can take minutes)."""
    from .checks import check_finite_weights, check_has_layers, resolve_device

    resolve_device(device)
    if norm not in ("sigma", "frobenius"):
        raise InputError(f"unknown norm {norm!r}", hint="use 'sigma' or 'frobenius'")
    if budget not in BUDGETS:
        raise InputError(f"unknown budget {budget!r}", hint="use 'both', 'params' or 'flops'")
    if strategy not in ("global", "uniform", "vbmf"):
        raise InputError(f"unknown rank strategy {strategy!r}", hint="use global, uniform or vbmf")
    if method != "auto":
        get_method(method)
    if ratio is not None:
        Ratio(float(ratio))
    if error is not None:
        ErrorBudget(float(error))
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise InputError(f"rank must be an int >= 1 or a per-layer ratio > 1, got {rank!r}", hint="e.g. rank=16")
        if isinstance(rank, int) and rank < 1:
            raise InputError(f"a rank must be at least 1, got {rank}", hint="e.g. rank=16")
        if isinstance(rank, float):
            Ratio(rank)
    check_has_layers(model)
    check_finite_weights(model)


def _check_target(min_agreement, max_output_error, ratio, rank, ranks, error, holdout) -> None:
    if min_agreement is not None and not 0 < min_agreement <= 1:
        raise InputError(f"min_agreement must be in (0, 1], got {min_agreement}", hint="e.g. 0.95")
    if max_output_error is not None and not max_output_error > 0:
        raise InputError(f"max_output_error must be > 0, got {max_output_error}", hint="e.g. 0.2")
    if (min_agreement is not None or max_output_error is not None) and any(
            x is not None for x in (ratio, rank, ranks, error)):
        raise InputError("give either a fidelity target or a size (ratio / rank / ranks / error), not both",
                         hint="drop --ratio to let the target choose it")
    if not 0 <= holdout < 1:
        raise InputError(f"holdout must be in [0, 1), got {holdout}", hint="e.g. 0.125")


def compress(
    model: nn.Module,
    data=None,
    *,
    store: str | CovarianceStore | None = None,
    ratio: float | None = None,
    budget: str = "both",
    rank=None,
    ranks: dict | None = None,
    error: float | None = None,
    method: str = "auto",
    norm: str = "sigma",
    strategy: str = "global",
    layers: str | list[str] | None = None,
    include_first: bool = False,
    include_last: bool = False,
    sequential: bool | None = None,
    config: MethodConfig | None = None,
    num_images: int | None = None,
    batch_size: int | None = None,
    transform=None,
    seed: int = 0,
    device: str | torch.device | None = None,
    input_shape: tuple[int, ...] | None = None,
    show_progress: bool | None = None,
    min_agreement: float | None = None,
    max_output_error: float | None = None,
    allocation: str = "sensitivity",
    holdout: float = 0.125,
) -> CompressResult:
    """Compress ``model`` with no fine-tuning; the original is not modified.

    Args:
        data: an image folder, a DataLoader or a tensor batch (calibration inputs). Optional
            when ``store`` is given (then ``sequential`` is not available).
        store: a covariance store (path or object) made for this model.
        ratio / budget: whole-model compression ratio; ``budget`` (:data:`BUDGETS`): ``both``
            (default) counts parameters and keeps every layer at most as many multiply-adds as
            its dense original (a format that would be slower is not chosen; a layer no format
            fits stays dense); ``params`` counts bytes only (low rank + sparse allowed);
            ``flops`` counts multiply-adds.
        rank / ranks / error: size every layer by an explicit rank (int) or layer ratio
            (float > 1), per-layer ranks, or a relative Sigma error budget.
        method: ``svd``, ``tucker2``, ``cp3``, ``cp4`` or ``auto`` (per layer, the lowest error
            at the allocated size).
        norm: ``sigma`` (data-driven) or ``frobenius`` (weights only, the baseline).
        strategy: ``global`` (budget where the error per parameter saved is smallest), ``uniform``
            or ``vbmf``.
        sequential: ``True``: fit each layer on the outputs of the already-compressed layers
            before it; ``False``: on the original inputs; ``"auto"`` / ``None`` (default when
            ``data`` is given): per layer, sequential only when it gives a clearly lower output
            error on a held-out quarter of the calibration images (an svd probe at the planned
            size is fitted both ways on the other three quarters; the mean per-image error
            difference must exceed ``SEQUENTIAL_Z`` = 3 standard errors). Measured: sequential
            wins on the VGG's convolutions at 16x (z 11-56) but loses on ResNet-18 (512 images,
            1x1 feature maps in layer4: it overfits); on the VGG's hidden classifier layer the
            held-out gain is mostly within noise (z -0.01 to 3.3) and fitting it sequentially
            cost 1.5-3 points of accuracy (it still passed in 2 of 20 compressions at 16x).
        min_agreement / max_output_error: a fidelity target instead of a ratio: the largest
            whole-model ratio whose held-out top-1 agreement with the original is at least
            ``min_agreement`` (and / or whose relative output error is at most
            ``max_output_error``), found by probing ratios with Sigma-SVD truncations
            (:mod:`ddtd.fidelity`), then fitted with ``method`` and checked on the same held-out
            inputs (up to :data:`TARGET_ATTEMPTS` fits, each at a smaller ratio). The probe curve
            is in ``report.fidelity["curve"]``.
        allocation: how ``strategy="global"`` compares layers in the Sigma norm:
            ``"sensitivity"`` (default; needs calibration inputs, else ``"relative"``) weighs each
            layer's absolute Sigma error by its effect on the model's output
            (:mod:`ddtd.sensitivity`); ``"relative"`` uses each layer's error relative to its own
            output energy (always so for the Frobenius norm, which uses no data).
        holdout: share of the calibration inputs (at least 4, when 16 or more are given) held
            out of the fit to measure fidelity (``report.fidelity``); 0 fits on all of them.
            With ``ratio``, a held-out agreement below :data:`POOR_AGREEMENT` is logged as a
            warning with the ratio that keeps :data:`SAFE_AGREEMENT`.

    Returns:
        :class:`CompressResult` with the compressed ``nn.Module`` (plain PyTorch), the
        :class:`Report` and the replacement records.
    """
    t0 = time.time()
    target = min_agreement is not None or max_output_error is not None
    _check_request(model, ratio=ratio, rank=rank, error=error, budget=budget, strategy=strategy, method=method,
                   norm=norm, device=device)
    _check_target(min_agreement, max_output_error, ratio, rank, ranks, error, holdout)
    cfg = config or MethodConfig(norm=norm)
    if cfg.norm != norm:
        cfg = MethodConfig(norm=norm, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed,
                           damping=cfg.damping, options=cfg.options)
    work, records = prepare(model)
    if device is not None:
        work = work.to(device)  # the copy: the caller's model stays on its device
    dev = next((p.device for p in work.parameters()), torch.device("cpu"))

    # Calibration inputs kept in memory when sequential fitting may need them again.
    batches = None
    if data is not None:
        from .calibration.run import _batches_from, first_layer_channels
        from .data import ImageTransform

        if transform is None and isinstance(data, (str, os.PathLike)):
            transform = ImageTransform(channels=first_layer_channels(model))
        if batch_size is None:
            from .calibration.run import auto_batch_size

            side = transform.size if transform is not None else (
                data.shape[-1] if isinstance(data, torch.Tensor) else 224)
            batch_size = auto_batch_size(side)
        it, _, _ = _batches_from(data, transform, num_images, seed, batch_size, lambda n: None)
        batches = [x.cpu() for x in it]
        if not batches:
            raise InputError("no calibration inputs", hint="pass a non-empty image folder, DataLoader or tensor")
    fid_b = None
    if batches is not None and holdout:
        batches, fid_b = _split_fidelity(batches, batch_size or 64, holdout, seed)
    if input_shape is None:
        if batches is None:
            raise InputError("input_shape is needed when compressing from a store alone",
                             hint="pass input_shape=(C, H, W) or --size")
        input_shape = tuple(batches[0].shape[1:])
    t_cal = time.time()
    if store is not None:
        st = store if isinstance(store, CovarianceStore) else CovarianceStore(store)
        st.check_model(model)
        moments = st
    else:
        if batches is None:
            raise InputError("nothing to calibrate on", hint="pass data (images / DataLoader / tensor) or a store")
        needed = [n for n in select_layers(work, layers)
                  if not _kept_dense_depthwise(get_module(work, n), method, rank)]
        moments = calibrate(work, torch.cat(batches), layers=needed, batch_size=batch_size,
                            show_progress=show_progress, check_variance=False).moments
        # on the CPU, like a store's: every later stage sees the same kind of moments, and
        # moves each layer's Sigma to the device only while fitting it
        moments = {n: lm.to_cpu() for n, lm in moments.items()}
    t_cal = time.time() - t_cal
    flat = set(warn_zero_variance({n: moments[n] for n in select_layers(work, layers) if n in moments}))

    seconds: dict[str, float] = {"calibrate": t_cal}
    plan_kw = dict(input_shape=input_shape, method=method, norm=norm, budget=budget, rank=rank, ranks=ranks,
                   error=error, strategy=strategy, layers=layers, include_first=include_first,
                   include_last=include_last)
    weights = None
    t = time.time()
    if allocation == "sensitivity" and norm == "sigma" and strategy == "global" and (ratio is not None or target):
        if batches is None:
            log.info("allocation: relative layer errors (output sensitivities need calibration inputs, "
                     "not only a store)")
        else:
            names = [n for n in select_layers(work, layers) if n in moments]
            sample = torch.cat(batches)[:SENSITIVITY_IMAGES]
            weights = output_sensitivity(work, list(sample.split(batch_size or 64)), names, device=dev, seed=seed)
    elif allocation not in ("sensitivity", "relative"):
        raise InputError(f"unknown allocation {allocation!r}", hint="use 'sensitivity' or 'relative'")
    seconds["sensitivity"] = time.time() - t

    held = HeldOut(work, [x.to(dev) for x in fid_b], dev) if fid_b else None
    probe_cache: dict = {}

    def probe_search(min_agree, max_err):
        if "probe" not in probe_cache:
            base, _, _ = plan(work, moments, **{**plan_kw, "ratio": 1.001, "rank": None, "ranks": None,
                                                "error": None, "method": "svd"}, weights=weights)
            probe_cache["probe"] = SvdProbe(work, moments, [p.name for p in base if p.method is not None]
                                            + [p.name for p in base if p.method is None and p.name in moments
                                               and "would not shrink" in p.reason],
                                            sigma_norm=norm == "sigma", out_weights=weights,
                                            correct_bias=cfg.bias_correction if cfg.bias_correction is not None
                                            else norm == "sigma")
        probe = probe_cache["probe"]

        def fidelity_at(r):
            try:
                pl, _, _ = plan(work, moments, **{**plan_kw, "ratio": r, "rank": None, "ranks": None,
                                                  "error": None, "method": "svd"},
                                weights=weights, spectra=probe.spectra())
            except InputError:
                return None
            return held.measure(probe.model_at({p.name: p.ranks for p in pl if p.method is not None}))

        return search_ratio(fidelity_at, min_agreement=min_agree, max_error=max_err)

    # with a store, the held-out inputs are out of the sequential / lrs fits but may be in the store
    fidelity: dict = {"holdout_images": held.images if held else 0, "from_store": store is not None}
    chosen = ratio
    if target:
        if held is None:
            raise InputError("a fidelity target needs held-out calibration inputs",
                             hint="pass data (images / DataLoader / tensor) with at least 16 inputs")
        t = time.time()
        chosen, curve = probe_search(min_agreement, max_output_error)
        seconds["search"] = time.time() - t
        fidelity.update(target={"min_agreement": min_agreement, "max_output_error": max_output_error},
                        curve=curve)
        if chosen is None:
            raise InputError(
                f"no compression meets the target on the {held.images} held-out inputs (probe curve: "
                + ", ".join(f"{c['ratio']:.2f}x: {_fmt_fid(c)}" for c in curve) + ")",
                hint="relax --min-agreement / --max-drop / --max-output-error, or calibrate on more images")
        log.info("fidelity target: the probes keep it up to %.3fx; fitting at that ratio", chosen)

    t_solve = time.time()
    for attempt in range(TARGET_ATTEMPTS if target else 1):
        result = _fit_all(work, moments, {**plan_kw, "ratio": chosen}, weights, records, batches, flat, cfg,
                          sequential, batch_size, dev, norm, method)
        if held is None:
            break
        reached = held.measure(result.model)
        fidelity["heldout"] = reached.to_dict()
        fidelity.setdefault("attempts", []).append({"ratio": result.report.ratio, **reached.to_dict()})
        if not target or reached.meets(min_agreement, max_output_error):
            break
        log.warning("the fitted model at %.3fx misses the target on held-out inputs (%s); trying a smaller ratio",
                    chosen, _fmt_fid(reached.to_dict()))
        chosen = 1 + (chosen - 1) * TARGET_BACKOFF
    t_solve = time.time() - t_solve
    report = result.report
    if held is not None:
        f = fidelity["heldout"]
        if target and not Fidelity(**{k: f[k] for k in ("agreement", "relative_error", "images")}).meets(
                min_agreement, max_output_error):
            log.warning("the target was not met on the held-out inputs: %s at %.3fx", _fmt_fid(f), report.ratio)
        elif not target and f["agreement"] is not None and f["agreement"] < POOR_AGREEMENT:
            t = time.time()
            safe, curve = probe_search(SAFE_AGREEMENT, None)
            seconds["search"] = time.time() - t
            fidelity["safe_ratio_estimate"] = safe
            fidelity["curve"] = curve
            log.warning("*** POOR FIDELITY: the compressed model agrees with the original on only %.1f%% of %d "
                        "held-out inputs (relative output error %.3f). %s ***", 100 * f["agreement"], f["images"],
                        f["relative_error"],
                        f"A ratio of about {safe:.2f}x keeps {100 * SAFE_AGREEMENT:.0f}% agreement (svd probe; "
                        f"--min-agreement {SAFE_AGREEMENT} finds it)" if safe else
                        f"No probed ratio keeps {100 * SAFE_AGREEMENT:.0f}% agreement")
        else:
            log.info("held-out fidelity: %s", _fmt_fid(f))
    report.fidelity = fidelity
    report.settings.update(allocation="sensitivity" if weights is not None else "relative",
                           min_agreement=min_agreement, max_output_error=max_output_error, holdout=holdout)
    report.seconds = {**seconds, "solve": t_solve, "total": time.time() - t0}
    result.model.ddtd_spec = getattr(model, "ddtd_spec", None)
    return result


#: Calibration inputs used to estimate the output sensitivities (one backward pass each).
SENSITIVITY_IMAGES = 128
#: Below this held-out agreement a ``ratio`` result is flagged loudly, with the ratio that keeps
#: :data:`SAFE_AGREEMENT`.
POOR_AGREEMENT = 0.90
SAFE_AGREEMENT = 0.99
#: With a fidelity target: fits tried, and the shrink of ``ratio - 1`` after a miss.
TARGET_ATTEMPTS = 3
TARGET_BACKOFF = 0.8


def _fmt_fid(f: dict) -> str:
    agree = f.get("agreement")
    err = f.get("relative_error")
    if err is None:
        return "out of reach"
    return (f"agreement {100 * agree:.1f}%, " if agree is not None else "") + f"relative output error {err:.3f}"


def _split_fidelity(batches, batch_size: int, fraction: float, seed: int):
    """Calibration inputs split into those fitted on and a held-out share for measuring fidelity
    (a seeded random subset, at least 4 inputs; none when fewer than 16 inputs are given)."""
    x = torch.cat(batches)
    if len(x) < 16:
        return batches, None
    n_h = max(4, int(round(len(x) * fraction)))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 7919))
    keep, hold = perm[:-n_h].sort().values, perm[-n_h:].sort().values
    return list(x[keep].split(batch_size)), list(x[hold].split(batch_size))


def _fit_all(work: nn.Module, moments, plan_kw: dict, weights, records0: list, batches, flat: set,
             cfg: MethodConfig, sequential, batch_size, dev, norm: str, method: str) -> CompressResult:
    """Plan and fit every layer of a copy of ``work`` (the BN-folded model); see :func:`compress`."""
    work = copy.deepcopy(work)
    records = list(records0)
    plans, shapes, macs = plan(work, moments, **plan_kw, weights=weights)
    mode = _sequential_mode(sequential, batches, norm)
    fit_b, held_b = (_split_holdout(_first_images(batches, SEQUENTIAL_IMAGES, batch_size or 64), batch_size or 64)
                     if mode == "auto" else (batches, None))
    reference = copy.deepcopy(work) if mode != "off" else None
    params_before = sum(q.numel() for q in work.parameters())  # BN folded, nothing replaced yet

    report = Report(settings=dict(method=method, norm=norm, ratio=plan_kw["ratio"], budget=plan_kw["budget"],
                                  rank=plan_kw["rank"], error=plan_kw["error"], strategy=plan_kw["strategy"],
                                  sequential=mode, layers=plan_kw["layers"], input_shape=list(plan_kw["input_shape"])))
    for name, reason in unsupported_layers(work).items():
        n = get_module(work, name).weight.numel()
        report.layers.append(LayerReport(name, type(get_module(work, name)).__name__, "dense", None, n, n,
                                         0, 0, None, None, 0.0, reason))
    select = _holdout_moments(work, batches, batch_size or 64) if (
        norm == "sigma" and batches is not None and any(
            p.method is not None and ("lrs" in p.candidates or p.method == "lrs") for p in plans)
        and "sparsity" not in cfg.options.get("lrs", {})) else {}
    for p in plans:
        layer = get_module(work, p.name)
        before = layer.weight.numel()
        mac_b = macs.get(p.name, 0)
        if p.method is None:
            report.layers.append(LayerReport(p.name, type(layer).__name__, "dense", None, before, before,
                                             mac_b, mac_b, None, None, 0.0, p.reason))
            continue
        ts = time.time()
        lm = moments[p.name]
        seq_info = {}
        use_seq = mode == "on"
        if mode == "auto":
            use_seq, seq_info, captured = _choose_sequential(p, layer, reference, work, fit_b, held_b, shapes,
                                                             cfg, dev)
            if use_seq:
                xs, xts = captured
        elif use_seq:
            xs = _capture_inputs(reference, p.name, batches, dev)
            xts = _capture_inputs(work, p.name, batches, dev)
            use_seq = not all(torch.equal(a, b) for a, b in zip(xs, xts))  # else nothing changed upstream
        if use_seq:
            c_tt, c_xt, mu_x, mu_t = _cross_moments(layer, xs, xts)
            del xs, xts
            target = _regression_target(layer.weight.detach(), c_tt, c_xt)
            sig, mean, mean_in = c_tt, mu_t, mu_x
        else:
            sig, mean, mean_in, target = lm.covariance(), lm.mean(), None, None
        ow = None if weights is None or cfg.norm != "sigma" else weights.get(p.name)
        lcfg = cfg
        if p.name in flat and cfg.norm == "sigma" and not use_seq:
            # no variance: fit the weights; the bias correction keeps the (constant) outputs exact
            lcfg = replace(cfg, norm="frobenius", bias_correction=True)
        best = None
        slower = []
        for m in p.candidates if method == "auto" else [p.method]:
            r = p.ranks if m == p.method or method != "auto" else _ranks_for_format(m, shapes[p.name], p.ranks)
            if r is None:
                continue
            if plan_kw["budget"] != "params" and layer_macs(m, shapes[p.name], r) > mac_b:
                slower.append(m)  # more multiply-adds than the dense layer: never, unless bytes only
                continue
            mcfg = lcfg
            if m == "lrs" and p.name in select and target is None and lcfg.norm == "sigma":
                mcfg = _with_option(lcfg, "lrs", select=tuple(x.to(dev) for x in select[p.name]))
            out = solve(p.name, layer, m, r, mcfg, sig.to(dev), mean.to(dev),
                        target=target, mean_in=None if mean_in is None else mean_in.to(dev), out_weights=ow)
            score = out["info"].get("weighted_error", out["sigma_error"]) if lcfg.norm == "sigma" \
                else out["weight_error"]
            if best is None or score < best[0]:
                best = (score, m, r, out)
        if best is None:
            report.layers.append(LayerReport(
                p.name, type(layer).__name__, "dense", None, before, before, mac_b, mac_b, None, None,
                time.time() - ts, f"{'/'.join(slower)} at this size would need more multiply-adds than the "
                "dense layer (--budget params allows it)"))
            continue
        _, m, r, out = best
        if method == "auto" and m in ("cp3", "cp4") and cfg.options.get("auto", {}).get("stabilize", True):
            # same error bound, lower sensitivity: robust to rounding and to upstream errors
            m = f"{m}-stable"
            out = solve(p.name, layer, m, r, lcfg, sig.to(dev), mean.to(dev),
                        target=target, mean_in=None if mean_in is None else mean_in.to(dev), out_weights=ow)
        if lcfg is not cfg:
            out["sigma_error"] = None  # relative to an input energy of zero: not defined
        records += assemble(work, {p.name: (m, out["factors"], out["bias"])})
        new = get_module(work, p.name)
        after = stored_units(new, exclude_bias=True)
        report.layers.append(LayerReport(
            p.name, type(layer).__name__, m, list(r) if isinstance(r, tuple) else r, before, after, mac_b,
            layer_macs(m, shapes[p.name], r), out["sigma_error"], out["weight_error"], time.time() - ts,
            "sequential" if use_seq else ("inputs without variance: fitted to the weights" if lcfg is not cfg else ""),
            info={**out["info"], **seq_info}))
        growth = norm_growth_warning(out["info"], p.name)
        if growth:
            log.warning(growth)
        log.info("%s: %s ranks %s, %d -> %d params, %s", p.name, m, r, before, after,
                 "no Sigma error (inputs without variance)" if out["sigma_error"] is None
                 else f"Sigma error {out['sigma_error']:.4f}")
    report.params_before = params_before
    report.params_after = stored_units(work)
    report.macs_before = sum(macs.values())
    report.macs_after = _macs_after(work, plan_kw["input_shape"], report)
    work.ddtd_spec = getattr(work, "ddtd_spec", None)
    return CompressResult(work, report, records)
