"""Which layers to compress, with which method, at which ranks.

:func:`plan` is the one place a size request (:class:`ddtd.config.Size`) becomes per-layer
ranks: a whole-model ratio spread by the global allocation (:func:`ddtd.ranks.allocate`), or
every layer sized alike (an explicit rank, a per-layer ratio, per-layer ranks, an error budget,
the VBMF rank), all resolved by :func:`ddtd.ranks.resolve_rank`. For ``auto`` each layer is sized
in the svd format (the yardstick); every candidate is then fitted at the same parameter budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibration.run import ZERO_VARIANCE
from .config import CompressConfig
from .errors import InputError
from .inputs import probe_input
from .layers import get_module, layer_dims, macs_by_layer
from .layers.attention import can_split
from .methods import AutoConfig, applicable, get_method
from .ranks import (ErrorBudget, LayerShape, Ratio, allocate, evbmf_rank, format_macs, format_params,
                    resolve_rank, whitened_spectrum)
from .selection import compressible_layers, layer_filter, why_excluded
from .solvers.formats import rank_for_budget

__all__ = ["LayerPlan", "Plan", "plan", "kept_attention", "layer_shape", "layer_macs", "ranks_for_format", "svd_ranks_at_size",
           "is_depthwise", "DEPTHWISE_REASON", "UNREACHED_WEIGHT", "AUTO_LRS_MAX_WEIGHTS"]


@dataclass
class LayerPlan:
    """What to do with one layer: ``method`` ``None`` means leave it dense (``reason`` says why);
    ``candidates``: the methods ``auto`` compares (the method alone otherwise)."""

    name: str
    method: str | None
    ranks: Any = None
    candidates: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class Plan:
    """Plans in module order, the shapes of the planned layers and every layer's dense
    multiply-adds per input."""

    layers: list[LayerPlan]
    shapes: dict[str, LayerShape]
    macs: dict[str, int]

    @property
    def active(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.method is not None]


#: Output weight of a layer the backward pass never reaches (its output does not reach the
#: model's output): next to nothing, so the allocation takes from it first.
UNREACHED_WEIGHT = 1e-30

#: Why a depthwise conv stays dense (see :func:`is_depthwise`).
DEPTHWISE_REASON = ("depthwise conv: one input channel per group, so no low-rank format is smaller "
                    "(kept dense; --rank F with --method lrs / sparse prunes it)")

#: ``auto`` tries low rank + sparse only on layers up to this many weights: its exact sparse
#: solves grow as rows x nonzeros^3 per row.
AUTO_LRS_MAX_WEIGHTS = 1 << 20


def is_depthwise(layer: nn.Module) -> bool:
    """One input channel per group: a ``kh x kw`` filter per channel has no low-rank form."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.in_channels == layer.groups


def prunes_depthwise(config: CompressConfig) -> bool:
    """Only a per-layer ratio with a budget-sized method (low rank + sparse, pruning) shrinks a
    depthwise conv; otherwise depthwise convs stay dense and are not calibrated."""
    m = config.method
    return (isinstance(config.size.rank, float) and not isinstance(m, AutoConfig)
            and get_method(m.name).sizing == "budget")


def layer_shape(layer: nn.Module, macs: int) -> LayerShape:
    """The :class:`LayerShape` of ``layer`` given its dense multiply-adds per input."""
    T, S, kh, kw, g = layer_dims(layer)
    pos_out = max(1, macs // max(1, layer.weight.numel()))
    pos_in = pos_out * layer.stride[0] * layer.stride[1] if isinstance(layer, nn.Conv2d) else pos_out
    return LayerShape(T=T, S=S, kh=kh, kw=kw, groups=g, pos_in=pos_in, pos_out=pos_out)


def _candidates(config: CompressConfig, layer: nn.Module) -> tuple[tuple[str, ...], str]:
    """The methods that can represent ``layer`` (for ``auto``: its candidates, plus lrs when the
    budget is bytes alone and the layer is small enough), or ``()`` and the reason."""
    m = config.method
    if isinstance(m, AutoConfig):
        names = [c.name for c in m.candidates]
        if config.size.budget == "params" and layer.weight.numel() <= AUTO_LRS_MAX_WEIGHTS:
            names.append("lrs")
    else:
        names = [m.name]
    cands = tuple(n for n in names if applicable(n, layer)[0])
    if not cands and applicable("svd", layer)[0]:
        cands = ("svd",)  # conv-only formats (tucker2, cp) leave Linear and 1x1 layers to svd
    return cands, ("" if cands else applicable(names[0], layer)[1])


def kept_attention(model: nn.Module) -> dict[str, str]:
    """Linear layers inside an ``nn.MultiheadAttention`` that was not rewritten (its forward
    reads their weights directly, so they stay as they are), with the reason."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            why = can_split(m)[1] or "MultiheadAttention not rewritten"
            out.update({f"{name}.{c}" if name else c: why for c, sub in m.named_modules()
                        if isinstance(sub, nn.Linear)})
    return out


def _layer_plan(name: str, layer: nn.Module, config: CompressConfig, filter_fn, moments, kept) -> LayerPlan:
    if name in kept:
        return LayerPlan(name, None, reason=kept[name])
    if not filter_fn(name, layer):
        return LayerPlan(name, None, reason=why_excluded(filter_fn, name))
    if is_depthwise(layer) and not prunes_depthwise(config):
        return LayerPlan(name, None, reason=DEPTHWISE_REASON)
    if name not in moments:
        raise InputError(f"layer '{name}' has no entry in the covariance store",
                         hint="calibrate with --layers covering it (or a larger --max-dim), or exclude it with --layers")
    cands, why = _candidates(config, layer)
    if not cands:
        return LayerPlan(name, None, reason=why)
    if config.size.ranks is not None and name not in config.size.ranks:
        return LayerPlan(name, None, reason="not in the ranks file")
    return LayerPlan(name, cands[0], candidates=cands)


def yardstick(method: str) -> str:
    """The format the rank allocation sizes ``method`` with: its own layer format, or svd for
    the budget-sized methods (which then get the bytes of that svd)."""
    m = get_method(method)
    return "svd" if m.sizing == "budget" else m.kind


def _spectra(model, moments, active, config: CompressConfig, weights, spectra) -> dict[str, torch.Tensor]:
    """Whitened spectra of the active layers (those given in ``spectra`` reused)."""
    out = dict(spectra or {})
    for name in active:
        if name in out:
            continue
        lm = moments[name]
        # inputs without variance say nothing about which outputs matter: size by the weights
        sigma = lm.covariance() if config.norm == "sigma" and lm.variance_fraction() >= ZERO_VARIANCE else None
        W = get_module(model, name).weight.detach().cpu()
        w = None if weights is None else weights.get(name, torch.full((W.shape[0],), UNREACHED_WEIGHT,
                                                                      dtype=torch.float64))
        out[name] = whitened_spectrum(W, sigma, w)
    return out


def _layer_request(model, name: str, size, fmt: str, shape: LayerShape, spec):
    """The rank request of one layer when every layer is sized alike."""
    if size.error is not None:
        return ErrorBudget(size.error)
    if size.ranks is not None:
        return size.ranks[name]
    if size.rank is not None:
        return Ratio(size.rank) if isinstance(size.rank, float) else size.rank
    T, S, kh, kw, g = layer_dims(get_module(model, name))  # vbmf
    r = max(1, max(evbmf_rank(spec[i].clamp_min(0).sqrt().numpy(), (T // g, S * kh * kw))
                   for i in range(spec.shape[0])))
    return svd_budget_request(fmt, shape, r)


def _sizes(model, config: CompressConfig, plan_: Plan, spectra, weights) -> dict:
    """Ranks per active layer (``None``: it would not shrink)."""
    size = config.size
    active = {p.name: p for p in plan_.active}
    auto = isinstance(config.method, AutoConfig)
    fmts = {n: yardstick("svd" if auto else p.method) for n, p in active.items()}
    shapes = plan_.shapes
    if size.ratio is not None:
        if size.scope == "layers":  # the ratio of the selected layers alone
            total = sum(s.dense_params if size.budget in ("params", "both") else plan_.macs.get(n, s.dense_macs)
                        for n, s in shapes.items())
        elif size.budget in ("params", "both"):
            total = sum(p.numel() for p in model.parameters())
        else:
            total = sum(plan_.macs.values())
        # output-weighted spectra are in one unit (the model's loss): compare them as they are
        w = None if weights is None else {n: 1.0 for n in active}
        return allocate({n: shapes[n] for n in active}, fmts, size, total=total, spectra=spectra, weights=w)
    return {n: resolve_rank(_layer_request(model, n, size, fmts[n], shapes[n], spectra.get(n)), fmts[n],
                            shapes[n], spectra.get(n), name=n) for n in active}


def plan(model: nn.Module, moments, config: CompressConfig, *, input_shape, filter_fn=None,
         weights: dict[str, torch.Tensor] | None = None, spectra: dict[str, torch.Tensor] | None = None) -> Plan:
    """Decide method and ranks per layer for ``config`` (its ``method``, ``norm`` and ``size``;
    a fidelity target is searched by the caller, which plans at the ratios it probes).

    Args:
        model: the (BN-folded) model; moments: per-layer :class:`ddtd.calibration.LayerMoments`
            or a store; input_shape: ``(C, H, W)`` of one input, or an example batch of one
            input of the model's own kinds (:mod:`ddtd.inputs`), for the multiply-adds.
        filter_fn: ``(name, module) -> bool``, the layers to compress (default
            :func:`ddtd.selection.layer_filter`: all but the input layer and the classifier).
        weights: per-layer ``(T,)`` output-channel weights (:mod:`ddtd.sensitivity`): the global
            allocation then compares the layers' output-weighted Sigma errors, all in the unit of
            the model's loss (``None``: each layer's error relative to its own output energy).
        spectra: precomputed spectra by layer name (:func:`ddtd.ranks.whitened_spectrum`, with
            the same weights), reused when given.
    """
    filter_fn = filter_fn or layer_filter(model)
    macs = macs_by_layer(model, probe_input(input_shape))
    result = Plan([], {}, macs)
    kept = kept_attention(model)
    for name in compressible_layers(model):
        layer = get_module(model, name)
        p = _layer_plan(name, layer, config, filter_fn, moments, kept)
        result.layers.append(p)
        if p.method is not None:
            result.shapes[name] = layer_shape(layer, macs.get(name, layer.weight.numel()))
    size = config.size
    need = size.strategy in ("global", "vbmf") or size.error is not None or isinstance(config.method, AutoConfig)
    spectra = _spectra(model, moments, [p.name for p in result.active], config, weights, spectra) if need else {}
    sizes = _sizes(model, config, result, spectra, weights)
    for p in result.active:
        r = sizes.get(p.name)
        shape = result.shapes[p.name]
        budget_sized = get_method(p.method).sizing == "budget"
        if r is None and budget_sized and isinstance(size.rank, float) and shape.S == 1:
            p.ranks = max(2, int(shape.dense_params / size.rank))  # a depthwise conv pruned at a per-layer ratio
        elif r is None:
            p.method, p.reason = None, "would not shrink at its allocated size"
        elif budget_sized and not isinstance(config.method, AutoConfig):
            p.ranks = format_params("svd", shape, r)  # the bytes of that svd, in 4-byte units
        else:
            p.ranks = r
    return result


def svd_budget_request(fmt: str, shape: LayerShape, r: int):
    """A rank found for the svd format, carried to ``fmt`` as the same parameter budget."""
    if fmt == "svd":
        return r
    return Ratio(max(1.0001, shape.dense_params / max(1, format_params("svd", shape, r))))


def ranks_for_format(method: str, shape: LayerShape, svd_rank: int):
    """Ranks of ``method`` with (at most) the parameters of an svd of rank ``svd_rank`` (a
    budget-sized method gets that many 4-byte units)."""
    m = get_method(method)
    if m.sizing == "budget":
        return format_params("svd", shape, svd_rank)
    if m.kind == "svd":
        return svd_rank
    return resolve_rank(svd_budget_request(m.kind, shape, svd_rank), m.kind, shape)


def svd_ranks_at_size(method: str, ranks, shape: LayerShape):
    """svd ranks with (at most) the size ``method`` has at ``ranks``: the cheap stand-in for a
    planned layer (the sequential decision's probe)."""
    m = get_method(method)
    if m.kind == "svd" and m.sizing == "ranks":
        return ranks
    size = int(ranks) if m.sizing == "budget" else format_params(m.kind, shape, ranks)
    g = shape.groups
    return rank_for_budget("svd", shape.T // g, shape.S, shape.kh, shape.kw, size / g)


def layer_macs(method: str, shape: LayerShape, ranks) -> int:
    """Multiply-adds per input of a layer replaced by ``method`` (a low-rank + sparse layer runs
    its merged dense weight: the original layer's count)."""
    m = get_method(method)
    if m.kind == "lrs":
        return shape.dense_macs
    return format_macs(m.kind, shape, ranks)
