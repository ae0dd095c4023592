"""Module surgery: look up / swap sub-modules by qualified name, and fold BatchNorm into convs.

BatchNorm folding (eval statistics).  A ``Conv2d`` (weight ``K (T, S/g, kh, kw)``, bias ``b``, 0
if absent) followed by ``BatchNorm2d`` (``gamma``, ``beta``, running ``mean``, ``var``, ``eps``)
computes ``gamma * (conv(x) - mean) / sqrt(var + eps) + beta``.  With
``s = gamma / sqrt(var + eps)`` (``(T,)``) this is one conv with

    ``K' = K * s[:, None, None, None]``,   ``b' = (b - mean) * s + beta``,

computed in float64 and stored in the conv's dtype; the BatchNorm is replaced by ``nn.Identity``.
Exact in eval mode (in train mode BatchNorm would use batch statistics, which no fold can).

Pair detection: ``torch.fx`` symbolic tracing finds every BatchNorm2d whose only input is the
output of a Conv2d that has no other user, both modules being called exactly once.  When the
model cannot be traced (data-dependent control flow), or with ``trace=False``, pairs come from
the structure instead: consecutive children of an ``nn.Sequential`` (which covers torchvision's
``downsample.0`` / ``downsample.1``) and siblings named ``convN`` / ``bnN`` (torchvision ResNet
blocks); that fallback trusts the names to reflect the forward.
"""

from __future__ import annotations

import copy
import difflib
import logging
import re
from collections import Counter

import torch
from torch import nn

from ddtd.errors import InputError

__all__ = ["get_module", "set_module", "find_conv_bn_pairs", "fold_conv_bn", "fold_batchnorm"]

log = logging.getLogger(__name__)


def _suggest(model: nn.Module, name: str) -> str:
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(f"'{c}'" for c in close) + "?"
    shown = ", ".join(f"'{n}'" for n in names[:6]) + (", ..." if len(names) > 6 else "")
    return f"use a name from model.named_modules(), e.g. {shown}" if names else \
        "the model has no sub-modules"


def get_module(model: nn.Module, qualified_name: str) -> nn.Module:
    """The sub-module at ``qualified_name`` (dot-separated, e.g. ``'layer1.0.conv1'`` or
    ``'features.3'``; ``''`` is the model itself).  Raises :class:`InputError` if absent."""
    if not isinstance(qualified_name, str):
        raise InputError(f"module name must be a string, got {type(qualified_name).__name__}",
                         hint="pass a dot-separated name such as 'layer1.0.conv1'")
    if qualified_name == "":
        return model
    mod = model
    parts = qualified_name.split(".")
    for i, part in enumerate(parts):
        child = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if child is None:
            where = ".".join(parts[:i]) or "the model"
            raise InputError(
                f"no module named '{qualified_name}' in {type(model).__name__}: {where} "
                f"({type(mod).__name__}) has no sub-module '{part}'",
                hint=_suggest(model, qualified_name))
        mod = child
    return mod


def set_module(model: nn.Module, qualified_name: str, new_module: nn.Module) -> nn.Module:
    """Replace the existing sub-module at ``qualified_name`` by ``new_module``, in place;
    returns the module that was there.  Works for attributes, ``nn.Sequential`` /
    ``nn.ModuleList`` indices (``'features.3'``) and ``nn.ModuleDict`` keys."""
    if not isinstance(new_module, nn.Module):
        raise InputError(f"cannot put a {type(new_module).__name__} at '{qualified_name}'",
                         hint="pass an nn.Module")
    if qualified_name == "":
        raise InputError("cannot replace the root module by name ''",
                         hint="give the qualified name of a sub-module, e.g. 'layer1.0.conv1'")
    old = get_module(model, qualified_name)
    parent_name, _, leaf = qualified_name.rpartition(".")
    parent = get_module(model, parent_name)
    parent._modules[leaf] = new_module
    return old


def _is_foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if (_is_foldable(modules.get(src.target), modules[node.target]) and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_structural(model: nn.Module) -> list[tuple[str, str]]:
    seen = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for pname, parent in model.named_modules():
        prefix = f"{pname}." if pname else ""
        children = [(n, m) for n, m in parent.named_children()]
        if isinstance(parent, nn.Sequential):
            cands = [(a, b) for (a, ma), (b, mb) in zip(children, children[1:])]
        else:
            names = dict(children)
            cands = []
            for n, _ in children:
                m = re.fullmatch(r"conv(\w*)", n)
                if m and f"bn{m.group(1)}" in names:
                    cands.append((n, f"bn{m.group(1)}"))
        for a, b in cands:
            ma, mb = parent._modules[a], parent._modules[b]
            if _is_foldable(ma, mb) and seen[id(ma)] == 1 and seen[id(mb)] == 1:
                pairs.append((prefix + a, prefix + b))
    return pairs


def find_conv_bn_pairs(model: nn.Module, *, trace: bool = True) -> list[tuple[str, str]]:
    """``[(conv_name, bn_name), ...]`` of foldable Conv2d -> BatchNorm2d pairs (see the module
    docstring; fx tracing first when ``trace``, the structural rules otherwise or on failure)."""
    if trace:
        try:
            return _pairs_fx(model)
        except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
            log.info("fold_batchnorm: torch.fx tracing failed (%s: %s); using module structure",
                     type(exc).__name__, exc)
    return _pairs_structural(model)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s eval-mode affine map into ``conv`` in place (formula in the module
    docstring); ``conv`` gains a bias parameter if it had none.  ``bn`` is left unchanged."""
    if not _is_foldable(conv, bn):
        raise InputError(
            f"cannot fold {type(bn).__name__} into {type(conv).__name__}",
            hint="the pair must be Conv2d -> BatchNorm2d with running statistics and "
                 "num_features == out_channels")
    f64 = torch.float64
    with torch.no_grad():
        var, mean = bn.running_var.to(f64), bn.running_mean.to(f64)
        gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + bn.eps)
        b = conv.bias.to(f64) if conv.bias is not None else torch.zeros_like(var)
        w = conv.weight.to(f64) * s.view(-1, 1, 1, 1)
        new_b = (b - mean.to(b.device)) * s + beta
        conv.weight.copy_(w.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        conv.bias.copy_(new_b.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module, *, inplace: bool = False,
                   trace: bool = True) -> tuple[nn.Module, dict[str, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv (eval statistics)
    and replace the BatchNorm by ``nn.Identity``.

    Args:
        model: any ``nn.Module``; its eval-mode outputs are unchanged by the fold.
        inplace: modify ``model`` itself; default ``False`` works on a deep copy.
        trace: detect pairs with ``torch.fx`` first (default); ``False`` uses only the
            structural rules (see the module docstring).

    Returns:
        ``(folded_model, {conv_name: bn_name})`` in graph order.
    """
    if not inplace:
        model = copy.deepcopy(model)
    folded: dict[str, str] = {}
    for conv_name, bn_name in find_conv_bn_pairs(model, trace=trace):
        conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        fold_conv_bn(conv, bn)
        set_module(model, bn_name, nn.Identity())
        folded[conv_name] = bn_name
    return model, folded
