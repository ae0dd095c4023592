"""Plain-data records of what was replaced, so a compressed model can be rebuilt from its
architecture plus a state dict loaded with ``torch.load(..., weights_only=True)``.

A record is a dict of str / int / bool / list / None only:

* replacement: ``{"kind": "svd" | "tucker2" | "cp3" | "cp4" | "tt" | "dense", "name": qualified
  name, "layer": <geometry of the original layer>, "ranks": [ints] (svd / cp: ``[r]``, tucker2:
  ``[R1, R2]``, tt: ``[R1, R2, R3]`` or a TT-matrix's bond ranks, dense: ``[]``), "bias":
  whether the replacement's last layer has a bias}``, plus ``"modes": [out_modes, in_modes]``
  for a TT-matrix;
  geometry: ``{"type": "Conv2d", "in_channels", "out_channels", "kernel_size": [kh, kw],
  "stride": [..], "padding": [..] | "same" | "valid", "dilation": [..], "groups",
  "padding_mode", "bias"}`` or ``{"type": "Linear", "in_features", "out_features", "bias"}``.
* low-rank + sparse: ``{"kind": "lrs", "name", "layer", "ranks": [], "bias", "desc":
  LowRankSparse.describe()}`` (rebuilt with :meth:`LowRankSparse.from_description`).
* BatchNorm fold: ``{"kind": "fold_bn", "conv": conv name, "bn": bn name}``.
* merge: ``{"kind": "merge", "name", "layer": geometry}``: the chain at ``name`` became one dense
  layer again (:mod:`ddtd.layers.merge`), before a further compression replaced it.
* attention split: ``{"kind": "split_attention", "name": name}``: the ``nn.MultiheadAttention``
  there becomes a :class:`ddtd.layers.attention.ProjectedAttention`.

:func:`apply_replacements` replays the records in order on a freshly built architecture: it
builds every chain with the same builder as the compression did, from zero placeholder factors,
so the module structure (and hence the state-dict keys and shapes) is identical; loading the
saved state dict then restores the weights exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ddtd.errors import InputError

from .builders import FORMATS, build, factor_shapes
from .surgery import get_module, set_module
from .tt import TTMatrix

__all__ = ["KINDS", "layer_spec", "describe_replacement", "describe_fold", "describe_split", "fold_records",
           "replace_layer", "apply_replacements"]

KINDS = ("dense",) + FORMATS + ("lrs",)


def _as_list(v) -> list | str:
    return v if isinstance(v, str) else [int(x) for x in v]


def layer_spec(layer: nn.Module, name: str | None = None) -> dict:
    """Geometry of an ``nn.Conv2d`` / ``nn.Linear`` as plain data (see the module docstring)."""
    if isinstance(layer, nn.Conv2d):
        return {"type": "Conv2d", "in_channels": int(layer.in_channels),
                "out_channels": int(layer.out_channels),
                "kernel_size": _as_list(layer.kernel_size), "stride": _as_list(layer.stride),
                "padding": _as_list(layer.padding), "dilation": _as_list(layer.dilation),
                "groups": int(layer.groups), "padding_mode": str(layer.padding_mode),
                "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        return {"type": "Linear", "in_features": int(layer.in_features),
                "out_features": int(layer.out_features), "bias": layer.bias is not None}
    where = f"layer '{name}'" if name else "layer"
    raise InputError(f"{where}: cannot describe a {type(layer).__name__}",
                     hint="only nn.Conv2d and nn.Linear layers are replaced")


def _norm_ranks(kind: str, ranks, layer: nn.Module, name: str, modes=None) -> list[int]:
    if kind in ("dense", "lrs"):
        if ranks not in (None, [], ()):
            raise InputError(f"layer '{name}': a dense record takes no ranks, got {ranks!r}",
                             hint="pass ranks=None for kind 'dense'")
        return []
    shapes = factor_shapes(kind, layer, ranks, name, modes=modes)   # validates kind / layer / ranks
    if kind == "tt":
        return [int(s[-1]) for s in shapes[:-1]] if len(shapes[0]) == 4 else \
            [int(shapes[0][1]), int(shapes[1][2]), int(shapes[2][2])]
    if kind == "tucker2":
        return [int(shapes[0][1]), int(shapes[2][1])]
    return [int(shapes[0][1])]


def describe_replacement(name: str, kind: str, layer: nn.Module, ranks=None, *,
                         bias: bool | None = None, modes=None) -> dict:
    """Record of replacing the layer ``name`` (the original ``layer``) by a ``kind`` chain.

    Args:
        name: qualified module name in the model.
        kind: ``'svd'``, ``'tucker2'``, ``'cp3'``, ``'cp4'`` or ``'dense'``.
        layer: the original ``nn.Conv2d`` / ``nn.Linear`` (before replacement).
        ranks: svd / cp3 / cp4 an int (per group), tucker2 ``(R1, R2)`` or one int, tt
            ``(R1, R2, R3)`` (conv) or the bond ranks of a TT-matrix, dense None.
        modes: a TT-matrix's ``(out_modes, in_modes)``, recorded as ``"modes"`` (default:
            :func:`ddtd.solvers.formats.tt_matrix_modes` with one core more than ranks).
        bias: whether the replacement carries a bias; default: whether ``layer`` has one.  A
            corrected bias given to a builder for a bias-free layer makes this ``True``.
    """
    if kind not in KINDS:
        raise InputError(f"layer '{name}': unknown kind {kind!r}", hint=f"use one of {KINDS}")
    spec = layer_spec(layer, name)
    has_bias = spec["bias"] if bias is None else bool(bias)
    if spec["bias"] and not has_bias:
        raise InputError(f"layer '{name}': the layer has a bias, so its replacement keeps one",
                         hint="pass bias=True or leave bias=None")
    rec = {"name": str(name), "kind": kind, "layer": spec,
           "ranks": _norm_ranks(kind, ranks, layer, name, modes), "bias": has_bias}
    if kind == "tt" and modes is not None:
        rec["modes"] = [[int(t) for t in modes[0]], [int(d) for d in modes[1]]]
    return rec


def describe_fold(conv_name: str, bn_name: str) -> dict:
    """Record of a BatchNorm fold (:func:`ddtd.layers.surgery.fold_batchnorm`)."""
    return {"kind": "fold_bn", "conv": str(conv_name), "bn": str(bn_name)}


def describe_split(name: str) -> dict:
    """Record of rewriting the ``nn.MultiheadAttention`` ``name`` with explicit projections."""
    return {"kind": "split_attention", "name": name}


def fold_records(folded: dict[str, str]) -> list[dict]:
    """Records for the ``{conv: bn}`` mapping returned by ``fold_batchnorm``."""
    return [describe_fold(c, b) for c, b in folded.items()]


def replace_layer(model: nn.Module, name: str, kind: str, factors: Sequence = (),
                  bias: torch.Tensor | None = None) -> dict:
    """Build the ``kind`` chain for the layer at ``name`` from ``factors`` (builder argument
    order; dense: ``[]`` or ``[weight]``), swap it in (in place) and return its record."""
    layer = get_module(model, name)
    if kind not in KINDS:
        raise InputError(f"layer '{name}': unknown kind {kind!r}", hint=f"use one of {KINDS}")
    if kind == "lrs":
        from .sparse import LowRankSparse

        if len(factors) != 1:
            raise InputError(f"layer '{name}': kind 'lrs' takes one LRSResult, got {len(factors)} factors",
                             hint="pass [lowrank_sparse(...)]")
        new = LowRankSparse.from_result(layer, factors[0], bias, name=name)
        rec = describe_replacement(name, kind, layer, None, bias=new.bias is not None)
        rec["desc"] = new.describe()
        set_module(model, name, new)
        return rec
    new = build(kind, layer, list(factors), bias, name=name)
    modes = None
    if kind == "dense":
        ranks = None
    elif kind == "tt" and isinstance(new, TTMatrix):
        ranks, modes = list(new.ranks), (new.out_modes, new.in_modes)
    elif kind == "tt":
        ranks = [new[0].out_channels // new[0].groups, new[1].out_channels // new[1].groups,
                 new[2].out_channels // new[2].groups]
    elif kind == "tucker2":
        ranks = [new[1].out_channels // new[1].groups, new[0].out_channels // new[0].groups]
    else:
        ranks = new[0].out_features if isinstance(new[0], nn.Linear) \
            else new[0].out_channels // new[0].groups
    last = new if kind == "dense" or isinstance(new, TTMatrix) else new[-1]
    rec = describe_replacement(name, kind, layer, ranks, bias=last.bias is not None, modes=modes)
    set_module(model, name, new)
    return rec


def _check_record(rec, i: int) -> None:
    if not isinstance(rec, dict) or "kind" not in rec:
        raise InputError(f"record {i} is not a replacement record: {rec!r}",
                         hint="pass the list made by describe_replacement / describe_fold")
    need = {"fold_bn": ("conv", "bn"), "split_attention": ("name",), "merge": ("name", "layer")}.get(
        rec["kind"], ("name", "layer", "ranks", "bias"))
    if rec["kind"] == "lrs":
        need += ("desc",)
    missing = [k for k in need if k not in rec]
    if rec["kind"] not in KINDS + ("fold_bn", "split_attention", "merge") or missing:
        raise InputError(f"record {i} ({rec.get('kind')!r}) is malformed; missing {missing}",
                         hint="the records must come from this version of ddtd; recompress")


def _apply_fold(model: nn.Module, rec: dict) -> None:
    conv, bn = get_module(model, rec["conv"]), get_module(model, rec["bn"])
    if not isinstance(conv, nn.Conv2d):
        raise InputError(f"fold record: '{rec['conv']}' is a {type(conv).__name__}, not a Conv2d",
                         hint="apply the records to the original architecture, folds first, in "
                              "the order they were recorded")
    if not isinstance(bn, (nn.BatchNorm2d, nn.Identity)):
        raise InputError(f"fold record: '{rec['bn']}' is a {type(bn).__name__}, not a "
                         "BatchNorm2d", hint="the records belong to a different architecture")
    set_module(model, rec["bn"], nn.Identity())
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                             device=conv.weight.device))


def _apply_split(model: nn.Module, rec: dict) -> None:
    from .attention import ProjectedAttention

    mha = get_module(model, rec["name"])
    if not isinstance(mha, nn.MultiheadAttention):
        raise InputError(f"attention record: '{rec['name']}' is a {type(mha).__name__}, not a MultiheadAttention",
                         hint="the records belong to a different architecture")
    set_module(model, rec["name"], ProjectedAttention.from_mha(mha))


def _apply_one(model: nn.Module, rec: dict) -> None:
    name, kind = rec["name"], rec["kind"]
    layer = get_module(model, name)
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise InputError(f"record for '{name}' ({kind}): the model has a {type(layer).__name__} "
                         "there, not a Conv2d / Linear",
                         hint="apply the records to a freshly built original architecture, once")
    # geometry only: whether the chain has a bias is rec["bias"] (a fold or a corrected bias
    # may have given the layer one)
    have, want = layer_spec(layer, name), dict(rec["layer"])
    have.pop("bias", None), want.pop("bias", None)
    if have != want:
        raise InputError(f"record for '{name}' describes {rec['layer']} but the model has "
                         f"{layer_spec(layer, name)}",
                         hint="the records belong to a different architecture; rebuild the "
                              "model the records were made for")
    dev, dt = layer.weight.device, layer.weight.dtype
    T = layer.weight.shape[0]
    bias = torch.zeros(T, dtype=dt, device=dev) if rec["bias"] else None
    if kind == "lrs":
        from .sparse import LowRankSparse

        desc = dict(rec["desc"], bias=bool(rec["bias"]))
        set_module(model, name, LowRankSparse.from_description(desc, dtype=dt, device=dev, name=name))
        return
    if kind == "dense":
        factors = []
    else:
        g = layer.groups if isinstance(layer, nn.Conv2d) else 1
        modes = rec.get("modes") if kind == "tt" else None
        shapes = factor_shapes(kind, layer, rec["ranks"], name, modes=modes)
        factors = [torch.zeros((g, *s) if g > 1 else s, dtype=dt, device=dev) for s in shapes]
    set_module(model, name, build(kind, layer, factors, bias, name=name))


def apply_replacements(model: nn.Module, records: Sequence[dict], *,
                       inplace: bool = False) -> nn.Module:
    """Replay ``records`` (in order) on ``model``, a freshly built original architecture, with
    zero placeholder weights; then ``model.load_state_dict(saved_state_dict)`` restores the
    compressed model exactly.

    Args:
        model: the original architecture (random or original weights, any dtype / device).
        records: from :func:`describe_replacement` / :func:`describe_fold` /
            :func:`replace_layer`; BatchNorm folds before the replacement of their conv.
        inplace: modify ``model`` itself; default ``False`` works on a deep copy.

    Returns:
        The rebuilt model.  Raises :class:`InputError` if a record does not fit the model.
    """
    if not isinstance(records, Sequence) or isinstance(records, (str, dict)):
        raise InputError(f"records must be a list of dicts, got {type(records).__name__}",
                         hint="pass the list of records saved with the compressed model")
    if not inplace:
        model = copy.deepcopy(model)
    for i, rec in enumerate(records):
        _check_record(rec, i)
        if rec["kind"] == "fold_bn":
            _apply_fold(model, rec)
        elif rec["kind"] == "split_attention":
            _apply_split(model, rec)
        elif rec["kind"] == "merge":
            from .merge import module_from_spec

            p = next(model.parameters())
            set_module(model, rec["name"], module_from_spec(rec["layer"], dtype=p.dtype, device=p.device))
        else:
            _apply_one(model, rec)
    return model
