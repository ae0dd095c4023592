"""Merge a compressed layer back into one dense layer, to compress a compressed model further.

A factor chain built by ddtd (svd, tucker2, cp3, cp4, tt: ``nn.Conv2d`` / ``nn.Linear`` layers
with no nonlinearity between them, or a :class:`~ddtd.layers.tt.TTMatrix`) or a :class:`~ddtd.layers.sparse.LowRankSparse` layer computes an
affine map ``y = W~ x + b`` of the original layer's geometry. :func:`merged_layer` recovers
``W~`` and ``b`` exactly (float rounding aside) by probing: the chain with every padding set to
zero, applied to one-hot patches of the kernel's extent (a batch of ``S kh kw`` inputs of size
``(kh - 1) dh + 1`` x ``(kw - 1) dw + 1``), has a 1 x 1 output whose entries are the columns of
``W~``; the bias is the output for a zero input. A Linear chain is probed with the identity.

Merging and re-solving keeps the number of layers: a second compression replaces the merged
layer by a new chain at its (lower) rank (the multi-stage scheme of Gusak et al., "Automated
multi-stage compression of neural networks" (MUSCO), ICCV Workshops 2019).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ddtd.errors import InputError

from .surgery import get_module, set_module

__all__ = ["merged_layer", "module_from_spec", "describe_merge", "merge_compressed"]


def module_from_spec(spec: dict, *, dtype=None, device=None) -> nn.Module:
    """A zero-weight ``nn.Conv2d`` / ``nn.Linear`` of the geometry ``spec``
    (:func:`ddtd.layers.layer_spec`)."""
    if spec.get("type") == "Linear":
        m = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    elif spec.get("type") == "Conv2d":
        m = nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]), stride=tuple(spec["stride"]),
                      padding=spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"]),
                      dilation=tuple(spec["dilation"]), groups=spec["groups"], bias=spec["bias"],
                      padding_mode=spec["padding_mode"])
    else:
        raise InputError(f"cannot build a layer of type {spec.get('type')!r}", hint="the records belong to another ddtd")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m.to(device=device, dtype=dtype)


@torch.no_grad()
def merged_layer(chain: nn.Module, spec: dict) -> nn.Module:
    """The dense layer of geometry ``spec`` that computes what ``chain`` computes."""
    p = next(chain.parameters())
    dense = module_from_spec({**spec, "bias": True}, dtype=p.dtype, device=p.device)
    if spec["type"] == "Linear":
        D = spec["in_features"]
        b = chain(torch.zeros(1, D, dtype=p.dtype, device=p.device))[0]
        dense.weight.copy_((chain(torch.eye(D, dtype=p.dtype, device=p.device)) - b).T)
        dense.bias.copy_(b)
        return dense
    probe = copy.deepcopy(chain).eval()
    for m in probe.modules():
        if isinstance(m, nn.Conv2d):
            m.padding, m.padding_mode = (0, 0), "zeros"
            m._reversed_padding_repeated_twice = [0, 0, 0, 0]
    (kh, kw), (dh, dw), S, g = spec["kernel_size"], spec["dilation"], spec["in_channels"], spec["groups"]
    H, W = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    x = torch.zeros(S * kh * kw, S, H, W, dtype=p.dtype, device=p.device)
    idx = torch.arange(S * kh * kw, device=p.device)
    s, ij = idx // (kh * kw), idx % (kh * kw)
    x[idx, s, (ij // kw) * dh, (ij % kw) * dw] = 1
    b = probe(torch.zeros(1, S, H, W, dtype=p.dtype, device=p.device)).reshape(-1)
    full = (probe(x).reshape(S * kh * kw, -1) - b).T.reshape(-1, S, kh, kw)  # (T, S, kh, kw)
    T = full.shape[0]
    Sg, Tg = S // g, T // g
    weight = torch.cat([full[k * Tg:(k + 1) * Tg, k * Sg:(k + 1) * Sg] for k in range(g)])
    dense.weight.copy_(weight)
    dense.bias.copy_(b)
    return dense


def describe_merge(name: str, spec: dict) -> dict:
    """Record of merging the compressed layer ``name`` back into a dense layer of geometry ``spec``."""
    return {"kind": "merge", "name": name, "layer": dict(spec, bias=True)}


def merge_compressed(model: nn.Module, records: list[dict]) -> list[dict]:
    """Merge (in place) every factor chain that ``records`` (a compressed model's replacement
    records) say was built, back into one dense layer; returns the merge records. Low-rank +
    sparse layers stay as they are."""
    done = []
    for rec in records:
        if rec.get("kind") in ("svd", "tucker2", "cp3", "cp4", "tt") and rec["name"] not in {d["name"] for d in done}:
            chain = get_module(model, rec["name"])
            if isinstance(chain, (nn.Conv2d, nn.Linear)):
                continue  # already dense
            set_module(model, rec["name"], merged_layer(chain, rec["layer"]))
            done.append(describe_merge(rec["name"], rec["layer"]))
    return done
