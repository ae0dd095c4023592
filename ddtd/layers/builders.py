"""Replacement modules built from decomposition factors, dense weights rebuilt from factors, and
parameter / multiply-add counts.

Notation.  The original layer is an ``nn.Conv2d`` with kernel ``K`` of shape ``(T, S/g, kh, kw)``
(``g`` groups), or an ``nn.Linear`` with weight ``(T, D)``.  Group ``k`` owns output channels
``[k*T_g, (k+1)*T_g)`` and input channels ``[k*S_g, (k+1)*S_g)`` (``T_g = T/g``, ``S_g = S/g``);
its matrix is ``W_k = K[k*T_g:(k+1)*T_g].reshape(T_g, D_g)``, ``D_g = S_g*kh*kw``, columns in
``F.unfold`` order (channel, row, col).

Factors per group (``g = 1``: plain tensors; ``g > 1``: a list / tuple of ``g`` tensors, or one
tensor with a leading group dim ``g`` as the solvers return them):

========  ===============================================  ==========================================
format    factors of group k                                rebuilt kernel of group k
========  ===============================================  ==========================================
svd       ``A (T_g, r)``, ``B (r, D_g)``                    ``W~ = A @ B``
tucker2   ``U (T_g, R1)``, ``G (R1, R2, kh, kw)``,          ``K~[t,s,i,j] = sum_ab U[t,a] G[a,b,i,j]
          ``V (S_g, R2)``                                   V[s,b]``
cp3       ``A (T_g, R)``, ``B (S_g, R)``, ``C (kh*kw, R)``  ``K~[t,s,i,j] = sum_r A[t,r] B[s,r]
                                                            C[i*kw+j, r]``
cp4       ``A (T_g, R)``, ``B (S_g, R)``, ``C (kh, R)``,    ``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i,r]
          ``E (kw, R)``                                     E[j,r]``
tt        ``C (S_g, R1)``, ``Y (R1, kh, R2)``,              ``K~[t,s,i,j] = sum C[s,a] Y[a,i,b]
(conv)    ``X (R2, kw, R3)``, ``T (R3, T_g)``               X[b,j,c] T[c,t]``
tt        cores ``G_k (r_{k-1}, t_k, d_k, r_k)``            ``W~ = `` the TT-matrix of the cores
(matrix)  (Linear, ungrouped 1x1 conv)                      (:func:`ddtd.solvers.tt.tt_full`)
========  ===============================================  ==========================================

Chains (all plain ``nn.Conv2d`` / ``nn.Linear`` in an ``nn.Sequential``; only the last layer has a
bias; every conv of a grouped layer is itself grouped, so the groups never mix and the chain is
exact):

* svd, conv:  ``Conv(S -> g r, kh x kw, original stride / padding / dilation / padding_mode,
  groups=g)`` with weight ``B.reshape(r, S_g, kh, kw)``, then ``Conv(g r -> T, 1x1, groups=g)``
  with weight ``A``.  Linear: ``Linear(D -> r, no bias)``, ``Linear(r -> T)``.
* tucker2: ``Conv(S -> g R2, 1x1, groups=g)`` (``V^T``), ``Conv(g R2 -> g R1, kh x kw, original
  geometry, groups=g)`` (``G``), ``Conv(g R1 -> T, 1x1, groups=g)`` (``U``).
* cp3: ``Conv(S -> g R, 1x1, groups=g)`` (``B^T``), depthwise ``Conv(g R -> g R, kh x kw,
  original geometry, groups=g R)`` (``C^T`` as ``(R, 1, kh, kw)``), ``Conv(g R -> T, 1x1,
  groups=g)`` (``A``).
* cp4: ``Conv(S -> g R, 1x1)``, depthwise ``kh x 1`` (stride ``(sh, 1)``, padding ``(ph, 0)``,
  dilation ``(dh, 1)``), depthwise ``1 x kw`` (stride ``(1, sw)``, padding ``(0, pw)``,
  dilation ``(1, dw)``), ``Conv(g R -> T, 1x1)``.
* tt: the TT convolution ``Conv(S -> g R1, 1x1)``, ``Conv(g R1 -> g R2, kh x 1)``,
  ``Conv(g R2 -> g R3, 1 x kw)`` (geometry split by axis as cp4), ``Conv(g R3 -> T, 1x1)``, all
  with ``groups=g``; for a Linear layer or an ungrouped 1x1 conv a
  :class:`ddtd.layers.tt.TTMatrix` (``nn.Linear`` cores between reshapes).

Why the chains are exact for every padding (zeros, 'same' incl. the asymmetric split of even
kernels, reflect / replicate / circular):

* A bias-free 1x1 conv commutes with padding: zero padding maps to zeros, and reflect / replicate
  / circular padding only copy pixels, ``pad(x)[i, j] = x[rho_h(i), rho_w(j)]``, which a pointwise
  map preserves.  So the 1x1 layers before the spatial conv never need padding.
* 2-D padding of any of these modes is the product of a row map and a column map
  (``pad = pad_h o pad_w``).  The ``kh x 1`` conv acts on every column alike and keeps the width,
  so ``conv_h(pad_w(y)) = pad_w(conv_h(y))`` and
  ``conv_w(conv_h(pad(x))) = conv_w(pad_w(conv_h(pad_h(x))))``: the vertical padding goes on the
  ``kh x 1`` conv and the horizontal on the ``1 x kw`` conv, each with the original mode.  With
  ``padding='same'`` both convs get ``'same'``; PyTorch splits each dimension as
  ``left = d*(k-1)//2``, ``right = d*(k-1) - left``, exactly as for the original kernel.

So no format / geometry combination needs an approximation.  What is refused (``InputError``):
tucker2 / cp3 / cp4 on a Linear layer (no spatial modes: use svd) and on a conv with one input
channel per group, e.g. depthwise (the input mode has size 1, so these chains only add
parameters: use svd or leave the layer dense).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddtd.errors import InputError, layer_label
from ddtd.solvers.formats import DEFAULT_TT_CORES, FORMATS, tt_matrix_modes

from .tt import TTMatrix, tt_conv_chain

__all__ = [
    "FORMATS", "BUILDERS", "build", "format_applies", "build_svd", "build_tucker2", "build_cp3", "build_cp4",
    "build_tt", "build_dense", "factorized_weight", "svd_weight", "tucker2_kernel", "cp3_kernel",
    "cp4_kernel", "dense_forward", "factor_shapes", "count_params", "count_macs", "macs_by_layer",
]


# --------------------------------------------------------------------------------------------
# geometry and validation
# --------------------------------------------------------------------------------------------


def _check_layer(layer: nn.Module, name: str | None) -> None:
    if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight is not None:
        return
    raise InputError(
        f"{layer_label(name)}: cannot build a factorised replacement for {type(layer).__name__}",
        hint="only nn.Conv2d and nn.Linear layers can be replaced; leave this layer dense")


#: Every convolution type whose multiply-adds are counted.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def layer_dims(layer: nn.Module) -> tuple[int, int, int, int, int]:
    """``(T, S_per_group, kh, kw, groups)`` of a layer to compress; a Linear layer is
    ``(T, D, 1, 1, 1)``."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels // layer.groups, kh, kw, layer.groups
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1, 1, 1
    raise InputError(f"unsupported layer type {type(layer).__name__}",
                     hint="ddtd compresses nn.Conv2d and nn.Linear layers")


def _shape_info(layer: nn.Module) -> tuple[int, int, int, int, int]:
    """``(T, S, kh, kw, g)`` of a Conv2d / Linear (Linear: ``kh = kw = g = 1``, ``S = D``)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1, 1, 1
    kh, kw = layer.kernel_size
    return layer.out_channels, layer.in_channels, kh, kw, layer.groups


def factor_shapes(kind: str, layer: nn.Module, ranks, name: str | None = None, *,
                  modes=None) -> list[tuple]:
    """Shapes of one group's factors of ``kind`` at ``ranks`` for ``layer`` (see the module table).

    ``ranks``: svd ``r``; tucker2 ``(R1, R2)`` (or one int for both); cp3 / cp4 ``R`` (an int or a
    one-element sequence); tt ``(R1, R2, R3)`` for a conv, the ``d - 1`` bond ranks of a
    TT-matrix (``modes``: its ``(out_modes, in_modes)``, default
    :func:`ddtd.solvers.formats.tt_matrix_modes` with ``d`` cores); an int is every bond.  Raises :class:`InputError` for a format that does not apply to the
    layer (see the module docstring) or ranks < 1.
    """
    _check_format(kind, layer, name)
    T, S, kh, kw, g = _shape_info(layer)
    Tg, Sg = T // g, S // g
    if kind == "tt":
        return _tt_shapes(layer, ranks, modes, name)
    r = _ranks(kind, ranks, name)
    if kind == "svd":
        return [(Tg, r[0]), (r[0], Sg * kh * kw)]
    if kind == "tucker2":
        R1, R2 = r
        return [(Tg, R1), (R1, R2, kh, kw), (Sg, R2)]
    if kind == "cp3":
        return [(Tg, r[0]), (Sg, r[0]), (kh * kw, r[0])]
    return [(Tg, r[0]), (Sg, r[0]), (kh, r[0]), (kw, r[0])]


def _is_matrix(layer: nn.Module) -> bool:
    """A Linear layer or a 1x1 conv: the ``tt`` format is a TT-matrix there."""
    return isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1)


def format_applies(kind: str, layer: nn.Module) -> tuple[bool, str]:
    """Can the factor format ``kind`` represent ``layer``? ``(ok, reason if not)``: tucker2, cp
    and the TT convolution need a conv kernel with several input channels per group (a Linear
    layer has no spatial modes; with one input channel per group, e.g. depthwise, the chain only
    adds parameters); the TT-matrix takes a Linear layer or an ungrouped, unpadded 1x1 conv."""
    if kind == "svd":
        return True, ""
    T, S, kh, kw, g = _shape_info(layer)
    if kind == "tt" and _is_matrix(layer):
        if isinstance(layer, nn.Linear):
            return True, ""
        if g > 1:
            return False, "a TT-matrix does not split groups: grouped 1x1 convs are left to svd"
        if not isinstance(layer.padding, str) and any(layer.padding):
            return False, "a TT-matrix replaces a 1x1 conv without padding"
        return True, ""
    if isinstance(layer, nn.Linear):
        return False, f"format '{kind}' needs a conv kernel; a Linear layer has no spatial modes"
    if S // g == 1:
        return False, (f"format '{kind}' makes no sense for a conv with one input channel per group "
                       f"(groups={g}, in_channels={S}, e.g. depthwise): the input-channel mode has size 1, "
                       "so the chain only adds parameters")
    return True, ""


def _check_format(kind: str, layer: nn.Module, name: str | None) -> None:
    """Raise :class:`InputError` unless ``kind`` is a format that applies to ``layer``."""
    _check_layer(layer, name)
    if kind not in FORMATS:
        raise InputError(f"{layer_label(name)}: unknown format {kind!r}", hint=f"use one of {FORMATS}")
    ok, why = format_applies(kind, layer)
    if not ok:
        raise InputError(f"{layer_label(name)}: {why}", hint="use method 'svd' for this layer or leave it dense")


def _ranks(kind: str, ranks, name: str | None) -> list[int]:
    if kind not in FORMATS:
        raise InputError(f"{layer_label(name)}: unknown format {kind!r}", hint=f"use one of {FORMATS}")
    if isinstance(ranks, (int,)) and not isinstance(ranks, bool):
        vals = [int(ranks), int(ranks)] if kind == "tucker2" else [int(ranks)]
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str):
        vals = [int(v) for v in ranks]
    else:
        raise InputError(f"{layer_label(name)}: ranks {ranks!r} are not an int or a list of ints",
                         hint="svd/cp3/cp4 take one rank, tucker2 takes (R1, R2)")
    want = 2 if kind == "tucker2" else 1
    if len(vals) != want:
        raise InputError(f"{layer_label(name)}: format '{kind}' takes {want} rank(s), got {vals}",
                         hint="svd/cp3/cp4 take one rank, tucker2 takes (R1, R2)")
    if min(vals) < 1:
        raise InputError(f"{layer_label(name)}: ranks must be >= 1, got {vals}",
                         hint="leave the layer dense instead of using rank 0")
    return vals


def _per_group(x, g: int, ndim: int, what: str, name: str | None) -> list[torch.Tensor]:
    """Split a factor into ``g`` per-group tensors of ``ndim`` dims each."""
    if isinstance(x, torch.Tensor):
        if x.dim() == ndim and g == 1:
            parts = [x]
        elif x.dim() == ndim + 1 and x.shape[0] == g:
            parts = list(x.unbind(0))
        else:
            raise InputError(
                f"{layer_label(name)}: factor {what} has shape {tuple(x.shape)}; expected {ndim} dims"
                + (f", or {ndim + 1} with a leading group dim {g}" if g > 1 else ""),
                hint="pass the factors exactly as the solver returned them for this layer")
    elif isinstance(x, Sequence) and not isinstance(x, str):
        if len(x) != g:
            raise InputError(f"{layer_label(name)}: factor {what} has {len(x)} groups, "
                             f"the layer has {g}",
                             hint="pass one factor per group of the layer")
        parts = list(x)
    else:
        raise InputError(f"{layer_label(name)}: factor {what} is a {type(x).__name__}, not a tensor",
                         hint="pass torch tensors (or a list of them, one per group)")
    for p in parts:
        if not isinstance(p, torch.Tensor) or p.dim() != ndim:
            raise InputError(f"{layer_label(name)}: factor {what} of one group is not a {ndim}-D tensor",
                             hint="pass the factors exactly as the solver returned them")
        if not torch.is_floating_point(p):
            raise InputError(f"{layer_label(name)}: factor {what} has dtype {p.dtype}",
                             hint="factors must be floating point tensors")
    return parts


def _grouped_factors(kind: str, layer: nn.Module, factors: Sequence, names: Sequence[str],
                     name: str | None) -> list[list[torch.Tensor]]:
    """Validate factors against ``layer`` and return them per group, cast to its dtype / device.

    Returns one list per factor, each with ``g`` tensors.  Ranks are read from the factors and
    must agree between factors and between groups.
    """
    _check_format(kind, layer, name)
    T, S, kh, kw, g = _shape_info(layer)
    ndims = {"svd": (2, 2), "tucker2": (2, 4, 2), "cp3": (2, 2, 2), "cp4": (2, 2, 2, 2),
             "tt": (2, 3, 3, 2)}[kind]
    if len(factors) != len(ndims):
        raise InputError(f"{layer_label(name)}: format '{kind}' takes {len(ndims)} factors, got {len(factors)}",
                         hint="pass the factors exactly as the solver returned them")
    per = [_per_group(f, g, nd, n, name) for f, nd, n in zip(factors, ndims, names)]
    first = [p[0] for p in per]
    if kind == "tt":
        ranks = (first[0].shape[1], first[1].shape[2], first[2].shape[2])
    elif kind == "svd":
        ranks = first[0].shape[1]
    elif kind == "tucker2":
        ranks = (first[0].shape[1], first[2].shape[1])
    else:
        ranks = first[0].shape[1]
    want = factor_shapes(kind, layer, ranks, name)
    dev, dt = layer.weight.device, layer.weight.dtype
    out = []
    for parts, shape, n in zip(per, want, names):
        for k, p in enumerate(parts):
            if tuple(p.shape) != tuple(shape):
                grp = f" (group {k})" if g > 1 else ""
                raise InputError(
                    f"{layer_label(name)}: factor {n}{grp} has shape {tuple(p.shape)}, expected "
                    f"{tuple(shape)} for {kind} of a layer with T={T}, S={S}, kernel {kh}x{kw}, "
                    f"groups={g}",
                    hint="check that the factors belong to this layer and that every group uses "
                         "the same ranks")
            if not torch.isfinite(p).all():
                raise InputError(f"{layer_label(name)}: factor {n} contains NaN or Inf",
                                 hint="re-run the solver for this layer (more damping) or leave it "
                                      "dense")
        out.append([p.detach().to(device=dev, dtype=dt) for p in parts])
    return out


def _final_bias(layer: nn.Module, bias, name: str | None) -> torch.Tensor | None:
    T = layer.weight.shape[0]
    if bias is None:
        return None if layer.bias is None else layer.bias.detach().clone()
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (T,):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise InputError(f"{layer_label(name)}: bias has shape {shape}, expected ({T},)",
                         hint="pass one bias value per output channel (or None to keep the "
                              "layer's bias)")
    if not torch.isfinite(bias).all():
        raise InputError(f"{layer_label(name)}: bias contains NaN or Inf",
                         hint="recompute the bias correction b + (W - W~) mu")
    return bias.detach().to(device=layer.weight.device, dtype=layer.weight.dtype)


# --------------------------------------------------------------------------------------------
# module construction
# --------------------------------------------------------------------------------------------

def _conv(in_c: int, out_c: int, kernel, weight: torch.Tensor, bias: torch.Tensor | None, *,
          stride=1, padding=0, dilation=1, groups: int = 1,
          padding_mode: str = "zeros") -> nn.Conv2d:
    m = nn.Conv2d(
        in_c, out_c, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias is not None, padding_mode=padding_mode,
        device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight.reshape(m.weight.shape))
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _linear(in_f: int, out_f: int, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    m = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _geometry(layer: nn.Conv2d) -> dict:
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                padding_mode=layer.padding_mode)


def build_svd(layer: nn.Module, A, B, bias: torch.Tensor | None = None, *,
              name: str | None = None) -> nn.Sequential:
    """Chain for ``W~ = A @ B`` (per group).

    Args:
        layer: the original ``nn.Conv2d`` (any groups, incl. depthwise) or ``nn.Linear``; its
            geometry, dtype and device are used.
        A: ``(T_g, r)``; B: ``(r, D_g)`` with ``D_g = (S/g)*kh*kw`` in unfold order (Linear:
            ``(T, r)``, ``(r, D)``).  Grouped: ``g`` of each (list or leading dim).
        bias: ``(T,)`` replacing the layer's bias (e.g. ``b + (W - W~) mu``); ``None`` keeps it.
        name: the layer's qualified name, for error messages.

    Returns:
        Conv: ``Sequential(Conv2d(S, g r, (kh, kw), original stride / padding / dilation /
        padding_mode, groups=g, bias=False), Conv2d(g r, T, 1, groups=g))``.
        Linear: ``Sequential(Linear(D, r, bias=False), Linear(r, T))``.
        ``r (D_g + T_g) g`` weights.
    """
    (As, Bs) = _grouped_factors("svd", layer, [A, B], ["A", "B"], name)
    b = _final_bias(layer, bias, name)
    r = As[0].shape[1]
    if isinstance(layer, nn.Linear):
        return nn.Sequential(_linear(layer.in_features, r, Bs[0], None),
                             _linear(r, layer.out_features, As[0], b))
    T, S, kh, kw, g = _shape_info(layer)
    w1 = torch.cat([Bk.reshape(r, S // g, kh, kw) for Bk in Bs])
    w2 = torch.cat(As)
    return nn.Sequential(
        _conv(S, g * r, (kh, kw), w1, None, groups=g, **_geometry(layer)),
        _conv(g * r, T, 1, w2, b, groups=g))


def build_tucker2(layer: nn.Conv2d, U, G, V, bias: torch.Tensor | None = None, *,
                  name: str | None = None) -> nn.Sequential:
    """Chain for ``K~[t,s,i,j] = sum_ab U[t,a] G[a,b,i,j] V[s,b]`` (per group).

    Args:
        layer: the original ``nn.Conv2d`` (``S/g >= 2``).
        U: ``(T_g, R1)``; G: ``(R1, R2, kh, kw)``; V: ``(S_g, R2)``; grouped: ``g`` of each.
        bias: ``(T,)`` replacing the layer's bias; ``None`` keeps it.

    Returns:
        ``Sequential(Conv2d(S, g R2, 1, groups=g, bias=False) [V^T],
        Conv2d(g R2, g R1, (kh, kw), original stride / padding / dilation / padding_mode,
        groups=g, bias=False) [G], Conv2d(g R1, T, 1, groups=g) [U])``.
    """
    Us, Gs, Vs = _grouped_factors("tucker2", layer, [U, G, V], ["U", "G", "V"], name)
    b = _final_bias(layer, bias, name)
    T, S, kh, kw, g = _shape_info(layer)
    R1, R2 = Us[0].shape[1], Vs[0].shape[1]
    return nn.Sequential(
        _conv(S, g * R2, 1, torch.cat([Vk.T for Vk in Vs]), None, groups=g),
        _conv(g * R2, g * R1, (kh, kw), torch.cat(Gs), None, groups=g, **_geometry(layer)),
        _conv(g * R1, T, 1, torch.cat(Us), b, groups=g))


def build_cp3(layer: nn.Conv2d, A, B, C, bias: torch.Tensor | None = None, *,
              name: str | None = None) -> nn.Sequential:
    """Chain for ``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i*kw+j, r]`` (per group).

    Args:
        layer: the original ``nn.Conv2d`` (``S/g >= 2``).
        A: ``(T_g, R)``; B: ``(S_g, R)``; C: ``(kh*kw, R)``; grouped: ``g`` of each.
        bias: ``(T,)`` replacing the layer's bias; ``None`` keeps it.

    Returns:
        ``Sequential(Conv2d(S, g R, 1, groups=g, bias=False) [B^T],
        Conv2d(g R, g R, (kh, kw), original geometry, groups=g R, bias=False) [C^T as
        (R, 1, kh, kw)], Conv2d(g R, T, 1, groups=g) [A])``.
    """
    As, Bs, Cs = _grouped_factors("cp3", layer, [A, B, C], ["A", "B", "C"], name)
    b = _final_bias(layer, bias, name)
    T, S, kh, kw, g = _shape_info(layer)
    R = As[0].shape[1]
    return nn.Sequential(
        _conv(S, g * R, 1, torch.cat([Bk.T for Bk in Bs]), None, groups=g),
        _conv(g * R, g * R, (kh, kw), torch.cat([Ck.T.reshape(R, 1, kh, kw) for Ck in Cs]), None,
              groups=g * R, **_geometry(layer)),
        _conv(g * R, T, 1, torch.cat(As), b, groups=g))


def build_cp4(layer: nn.Conv2d, A, B, C, E, bias: torch.Tensor | None = None, *,
              name: str | None = None) -> nn.Sequential:
    """Chain for ``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i,r] E[j,r]`` (per group).

    Args:
        layer: the original ``nn.Conv2d`` (``S/g >= 2``).
        A: ``(T_g, R)``; B: ``(S_g, R)``; C: ``(kh, R)``; E: ``(kw, R)``; grouped: ``g`` of each.
        bias: ``(T,)`` replacing the layer's bias; ``None`` keeps it.

    Returns:
        ``Sequential(Conv2d(S, g R, 1, groups=g) [B^T],
        Conv2d(g R, g R, (kh, 1), stride (sh, 1), padding (ph, 0) or 'same', dilation (dh, 1),
        groups=g R) [C], Conv2d(g R, g R, (1, kw), stride (1, sw), padding (0, pw) or 'same',
        dilation (1, dw), groups=g R) [E], Conv2d(g R, T, 1, groups=g) [A])``; both spatial
        convs use the original padding_mode (exact, see the module docstring).
    """
    As, Bs, Cs, Es = _grouped_factors("cp4", layer, [A, B, C, E], ["A", "B", "C", "E"], name)
    b = _final_bias(layer, bias, name)
    T, S, kh, kw, g = _shape_info(layer)
    R = As[0].shape[1]
    geo_h, geo_w = axis_geometry(layer)
    return nn.Sequential(
        _conv(S, g * R, 1, torch.cat([Bk.T for Bk in Bs]), None, groups=g),
        _conv(g * R, g * R, (kh, 1), torch.cat([Ck.T.reshape(R, 1, kh, 1) for Ck in Cs]), None,
              groups=g * R, **geo_h),
        _conv(g * R, g * R, (1, kw), torch.cat([Ek.T.reshape(R, 1, 1, kw) for Ek in Es]), None,
              groups=g * R, **geo_w),
        _conv(g * R, T, 1, torch.cat(As), b, groups=g))


def axis_geometry(layer: nn.Conv2d) -> tuple[dict, dict]:
    """The geometry of the ``kh x 1`` and the ``1 x kw`` convs that split ``layer``'s kernel by
    axis: stride ``(sh, 1)`` / ``(1, sw)``, padding ``(ph, 0)`` / ``(0, pw)`` (or the same
    ``'same'`` / ``'valid'``), dilation ``(dh, 1)`` / ``(1, dw)``, the original padding mode
    (exact, see the module docstring)."""
    (sh, sw), (dh, dw), mode = layer.stride, layer.dilation, layer.padding_mode
    if isinstance(layer.padding, str):
        pad_h = pad_w = layer.padding
    else:
        ph, pw = layer.padding
        pad_h, pad_w = (ph, 0), (0, pw)
    return (dict(stride=(sh, 1), padding=pad_h, dilation=(dh, 1), padding_mode=mode),
            dict(stride=(1, sw), padding=pad_w, dilation=(1, dw), padding_mode=mode))


def _tt_shapes(layer: nn.Module, ranks, modes, name: str | None) -> list[tuple]:
    T, S, kh, kw, g = _shape_info(layer)
    Tg, Sg = T // g, S // g
    one = isinstance(ranks, int) and not isinstance(ranks, bool)
    if _is_matrix(layer):
        om, im = tt_matrix_modes(Tg, Sg * kh * kw, DEFAULT_TT_CORES if one else len(ranks) + 1,
                                 *(modes if modes is not None else (None, None)))
        rs = [int(ranks)] * (len(om) - 1) if one else [int(r) for r in ranks]
        if len(rs) != len(om) - 1 or min(rs, default=1) < 1:
            raise InputError(f"{layer_label(name)}: TT-matrix ranks {ranks} for {len(om)} cores",
                             hint="one int >= 1 per bond")
        rs = [1] + rs + [1]
        return [(rs[k], t, d, rs[k + 1]) for k, (t, d) in enumerate(zip(om, im))]
    rs = [int(ranks)] * 3 if one else [int(r) for r in ranks]
    if len(rs) != 3 or min(rs) < 1:
        raise InputError(f"{layer_label(name)}: a TT convolution takes ranks (R1, R2, R3), got {ranks}",
                         hint="three ints >= 1, or one for all three")
    R1, R2, R3 = rs
    return [(Sg, R1), (R1, kh, R2), (R2, kw, R3), (R3, Tg)]


def _tt_matrix_cores(layer: nn.Module, cores, name: str | None) -> list[torch.Tensor]:
    """TT-matrix cores validated against ``layer`` (shapes from their own ranks and modes)."""
    if not cores or not all(isinstance(c, torch.Tensor) and c.dim() == 4 for c in cores):
        raise InputError(f"{layer_label(name)}: a TT-matrix takes 4-D cores (r_{{k-1}}, t_k, d_k, r_k)",
                         hint="pass the cores as tt_matrix returned them")
    modes = ([c.shape[1] for c in cores], [c.shape[2] for c in cores])
    want = factor_shapes("tt", layer, [c.shape[3] for c in cores[:-1]], name, modes=modes)
    dev, dt = layer.weight.device, layer.weight.dtype
    for k, (c, w) in enumerate(zip(cores, want)):
        if tuple(c.shape) != tuple(w):
            raise InputError(f"{layer_label(name)}: TT-matrix core {k} has shape {tuple(c.shape)}, expected {w}",
                             hint="check that the cores belong to this layer")
        if not torch.isfinite(c).all():
            raise InputError(f"{layer_label(name)}: TT-matrix core {k} contains NaN or Inf",
                             hint="re-run the solver for this layer (more damping) or leave it dense")
    return [c.detach().to(device=dev, dtype=dt) for c in cores]


def build_tt(layer: nn.Module, *factors, bias: torch.Tensor | None = None,
             name: str | None = None) -> nn.Module:
    """The ``tt`` replacement of ``layer`` (see the module docstring).

    Args:
        layer: a ``kh x kw`` ``nn.Conv2d`` (``S/g >= 2``): factors ``C (S_g, R1)``,
            ``Y (R1, kh, R2)``, ``X (R2, kw, R3)``, ``T (R3, T_g)`` (grouped: ``g`` of each);
            a Linear layer or an ungrouped unpadded 1x1 conv: the TT-matrix cores
            ``G_k (r_{k-1}, t_k, d_k, r_k)`` (modes read from the cores).
        bias: ``(T,)`` replacing the layer's bias; ``None`` keeps it.

    Returns:
        The TT-convolution ``nn.Sequential`` of four ``nn.Conv2d``, or a
        :class:`ddtd.layers.tt.TTMatrix`.
    """
    _check_format("tt", layer, name)
    b = _final_bias(layer, bias, name)
    if _is_matrix(layer):
        cores = _tt_matrix_cores(layer, list(factors), name)
        conv = isinstance(layer, nn.Conv2d)
        return TTMatrix.from_cores(cores, b, conv=conv, stride=layer.stride if conv else (1, 1), name=name)
    Cs, Ys, Xs, Ts = _grouped_factors("tt", layer, list(factors), ["C", "Y", "X", "T"], name)
    return tt_conv_chain(layer, (Cs, Ys, Xs, Ts), b, _conv, axis_geometry(layer))


def build_dense(layer: nn.Module, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, name: str | None = None) -> nn.Module:
    """A new layer of the same type and geometry ("leave dense"), optionally with a new weight
    (shape of ``layer.weight``) and / or bias ``(T,)`` (a layer without bias gains one).

    Returns a single ``nn.Conv2d`` / ``nn.Linear`` (not a Sequential), so the state-dict keys
    stay ``name.weight`` / ``name.bias``.
    """
    _check_layer(layer, name)
    w = layer.weight.detach() if weight is None else weight
    if not isinstance(w, torch.Tensor) or w.shape != layer.weight.shape:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise InputError(f"{layer_label(name)}: weight has shape {shape}, expected "
                         f"{tuple(layer.weight.shape)}", hint="pass a weight of the layer's shape")
    w = w.detach().to(device=layer.weight.device, dtype=layer.weight.dtype)
    b = _final_bias(layer, bias, name)
    if isinstance(layer, nn.Linear):
        return _linear(layer.in_features, layer.out_features, w, b)
    return _conv(layer.in_channels, layer.out_channels, layer.kernel_size, w, b,
                 groups=layer.groups, **_geometry(layer))


BUILDERS = {"svd": build_svd, "tucker2": build_tucker2, "cp3": build_cp3, "cp4": build_cp4, "tt": build_tt}


def build(kind: str, layer: nn.Module, factors: Sequence, bias: torch.Tensor | None = None, *,
          name: str | None = None) -> nn.Module:
    """Dispatch: ``kind`` in ``('dense',) + FORMATS``; ``factors`` in the order of the builder's
    arguments (``dense``: ``[]`` or ``[weight]``)."""
    if kind == "dense":
        return build_dense(layer, factors[0] if factors else None, bias, name=name)
    if kind not in BUILDERS:
        raise InputError(f"{layer_label(name)}: unknown method {kind!r}",
                         hint=f"use one of {('dense',) + FORMATS}")
    return BUILDERS[kind](layer, *factors, bias=bias, name=name)


# --------------------------------------------------------------------------------------------
# dense weights from factors
# --------------------------------------------------------------------------------------------

def svd_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A (T, r) @ B (r, D)`` -> ``(T, D)``."""
    return A @ B


def tucker2_kernel(U: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``K~[t,s,i,j] = sum_ab U[t,a] G[a,b,i,j] V[s,b]`` -> ``(T, S, kh, kw)``."""
    return torch.einsum("ta,abij,sb->tsij", U, G, V)


def cp3_kernel(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, kernel_size) -> torch.Tensor:
    """``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i*kw+j, r]`` -> ``(T, S, kh, kw)``."""
    kh, kw = kernel_size
    return torch.einsum("tr,sr,pr->tsp", A, B, C).reshape(A.shape[0], B.shape[0], kh, kw)


def cp4_kernel(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """``K~[t,s,i,j] = sum_r A[t,r] B[s,r] C[i,r] E[j,r]`` -> ``(T, S, kh, kw)``."""
    return torch.einsum("tr,sr,ir,jr->tsij", A, B, C, E)


def factorized_weight(layer: nn.Module, kind: str, *factors,
                      name: str | None = None) -> torch.Tensor:
    """The dense weight that the factors of ``kind`` represent, shaped like ``layer.weight``:
    ``(T, S/g, kh, kw)`` for a conv (groups stacked along ``T``), ``(T, D)`` for a Linear; in
    the layer's dtype / device.  Factors are validated as by the builders."""
    names = {"svd": "AB", "tucker2": "UGV", "cp3": "ABC", "cp4": "ABCE", "tt": "CYXT"}.get(kind)
    if names is None:
        raise InputError(f"{layer_label(name)}: unknown format {kind!r}", hint=f"use one of {FORMATS}")
    if kind == "tt" and _is_matrix(layer):
        from ddtd.solvers.tt import tt_full

        _check_format(kind, layer, name)
        return tt_full(_tt_matrix_cores(layer, list(factors), name)).reshape(layer.weight.shape)
    per = _grouped_factors(kind, layer, list(factors), list(names), name)
    T, S, kh, kw, g = _shape_info(layer)
    blocks = []
    for fs in zip(*per):
        if kind == "svd":
            blocks.append(svd_weight(*fs))
        elif kind == "tucker2":
            blocks.append(tucker2_kernel(*fs))
        elif kind == "tt":
            blocks.append(torch.einsum("sa,ayb,bxc,ct->tsyx", *fs))
        elif kind == "cp3":
            blocks.append(cp3_kernel(*fs, (kh, kw)))
        else:
            blocks.append(cp4_kernel(*fs))
    return torch.cat(blocks).reshape(layer.weight.shape)


def dense_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s own forward with ``weight`` / ``bias`` substituted (``None``: the layer's),
    i.e. the reference a chain must match: same stride, padding (incl. 'same' and padding
    modes), dilation and groups."""
    _check_layer(layer, None)
    w = layer.weight if weight is None else weight
    b = layer.bias if bias is None else bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return layer._conv_forward(x, w, b)


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------

def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def _layer_macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    k = 1
    for s in m.kernel_size:
        k *= s
    if m.transposed:   # every input element meets (out/g) * prod(kernel) weights
        return inp.numel() * (m.out_channels // m.groups) * k
    return out.numel() * (m.in_channels // m.groups) * k


def macs_by_layer(module: nn.Module, input_shape, *, dtype: torch.dtype | None = None,
                  device=None) -> dict[str, int]:
    """Multiply-adds of every conv (``Conv1d/2d/3d`` and their transposes, grouped included) and
    Linear in ``module`` for one forward pass on a zero input of ``input_shape`` (batch dim
    included), or on ``input_shape`` itself when it is an example batch (a tensor, a tuple of
    tensors or a dict, :mod:`ddtd.inputs`: inputs of the model's own kinds, e.g. token ids).

    Per call: conv ``numel(output) * (C_in/g) * prod(kernel)``; transposed conv
    ``numel(input) * (C_out/g) * prod(kernel)``; Linear ``numel(output) * in_features``.  Biases
    are not counted.  A module called several times counts every call.  The forward runs in eval
    mode under ``no_grad`` (training flags are restored, so BatchNorm statistics are untouched).

    Returns ``{qualified name: multiply-adds}`` for the layers that ran.
    """
    first = next(module.parameters(), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = device or (first.device if first is not None else "cpu")
    counts: dict[str, int] = {}
    hooks = []
    for qn, m in module.named_modules():
        if isinstance(m, (nn.Linear, *CONV_TYPES)):
            def hook(mod, args, out, qn=qn):
                counts[qn] = counts.get(qn, 0) + _layer_macs(mod, args[0], out)
            hooks.append(m.register_forward_hook(hook))
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            from ddtd.inputs import call_model, is_shape, to_device

            if is_shape(input_shape):
                module(torch.zeros(tuple(input_shape), dtype=dtype, device=device))
            else:
                call_model(module, to_device(input_shape, device))
    finally:
        for h in hooks:
            h.remove()
        for m, t in flags:
            m.training = t
    return counts


def count_macs(module: nn.Module, input_shape, *, dtype: torch.dtype | None = None,
               device=None) -> int:
    """Total multiply-adds of the convs and Linear layers for one forward on ``input_shape``
    (see :func:`macs_by_layer`)."""
    return sum(macs_by_layer(module, input_shape, dtype=dtype, device=device).values())
