"""Streaming second moments of the inputs that Conv2d / Linear layers see.

These are pure functions on tensors. For a Conv2d with weight ``(T, S, kh, kw)`` and ``g``
groups, each output position sees an unfolded patch ``x`` of length ``D = (S/g)*kh*kw`` per
group, in the ``(channel, row, column)`` order of :func:`torch.nn.functional.unfold`. The layer
computes ``y = W x + b`` with ``W = weight.reshape(T, D)`` (per group). We accumulate, over
every image and every output position,

* ``xxT[g]  = sum x x^T``   shape ``(g, D, D)``
* ``x_sum[g] = sum x``       shape ``(g, D)``
* ``count``  = number of patches (per group; equal for every group)

**Why not unfold?** ``unfold`` copies every input value ``kh*kw`` times and ``X^T X`` on the
unfolded matrix costs ``P * D^2`` multiply-adds for ``P`` patches, that is ``D/T`` (about 9x
for a 3x3 conv with ``T = S``) the cost of the convolution itself. Instead we use the block
structure of Sigma: the ``(a, b)`` block (kernel offsets ``a``, ``b``) is

    sum_p X[:, s*p + d*a] X[:, s*p + d*b]^T

a cross-product of two *shifted windows* of the (padded) input. Writing ``d*a = s*o_a + f_a``
(offset ``o_a`` and phase ``f_a`` on the stride lattice), both windows live on strided
sub-images ``X[f::s]`` and are contiguous there; pairs of offsets with the same phases and the
same relative shift ``o_b - o_a`` share one cross-correlation and differ only by where their
window starts. We cut the sub-image at every window edge into cells, compute one small GEMM
per cell and lag, and add cells up per block. The cost is about ``P * C^2`` per distinct lag
(13 lags for a 3x3 conv, versus 40.5 for a symmetric ``X^T X`` of the unfolded patches), the
same float32 GEMMs, no unfolded copy, and the result is exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "conv_input_moments",
    "conv_moment_blocks",
    "assemble_blocks",
    "linear_input_moments",
    "unfold_patches",
]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a Conv2d that determines the patches it sees.

    ``pad`` is ``(top, bottom, left, right)`` (may be asymmetric for ``padding='same'``).
    """

    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str = "zeros"

    @property
    def dim(self) -> int:
        """Patch length per group, ``D = (S/g)*kh*kw``."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]


def conv_geometry(conv: torch.nn.Conv2d) -> ConvGeometry:
    """Read the geometry of a ``nn.Conv2d`` (handles ``padding='same'/'valid'``)."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pad = (0, 0, 0, 0)
        else:  # 'same': torch puts the extra pixel at the end
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = conv.padding
        pad = (ph, ph, pw, pw)
    return ConvGeometry(
        in_channels=conv.in_channels,
        kernel_size=(kh, kw),
        stride=tuple(conv.stride),
        pad=pad,
        dilation=(dh, dw),
        groups=conv.groups,
        padding_mode=conv.padding_mode,
    )


def _pad(x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    top, bottom, left, right = geo.pad
    if top == bottom == left == right == 0:
        return x
    mode = "constant" if geo.padding_mode == "zeros" else geo.padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode)


def unfold_patches(x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """Reference unfolding: ``(N, S, H, W) -> (g, N*L, D)`` patches exactly as the conv sees them.

    Slow and memory hungry (it copies every input value ``kh*kw`` times); used by tests and
    as a reference, not by the calibration hooks.
    """
    xp = _pad(x, geo)
    cols = F.unfold(xp, geo.kernel_size, dilation=geo.dilation, stride=geo.stride)  # (N, S*kk, L)
    n, _, length = cols.shape
    g = geo.groups
    cols = cols.reshape(n, g, geo.dim, length).permute(1, 0, 3, 2)
    return cols.reshape(g, n * length, geo.dim)


def _axis_plan(size_padded: int, k: int, s: int, d: int):
    """Per kernel offset along one axis: (phase, offset) on the stride lattice, and output length."""
    out = (size_padded - d * (k - 1) - 1) // s + 1
    plan = [divmod(d * a, s)[::-1] for a in range(k)]  # (phase f, offset o) with d*a = s*o + f
    return plan, out


def _lag_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_m a[m]^T b[m]`` per group: ``(M, g, Cg) x (M, g, Cg) -> (g, Cg, Cg)``, no copies."""
    if a.shape[1] == 1:
        return (a[:, 0].T @ b[:, 0]).unsqueeze(0)
    if a.shape[2] == 1:  # depthwise: one number per group
        return (a[:, :, 0] * b[:, :, 0]).sum(0).reshape(-1, 1, 1)
    return torch.bmm(a.permute(1, 2, 0), b.permute(1, 0, 2))


def _unfold_moments(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None,
                    max_elems: int = 1 << 26):
    """Moments by explicit unfolding, a few images at a time (at most ``max_elems`` values)."""
    xxT = x_sum = None
    count = 0
    per_image = unfold_patches(x[:1], geo).numel()
    step = max(1, max_elems // max(1, per_image))
    for i in range(0, x.shape[0], step):
        px = unfold_patches(x[i : i + step], geo)  # (g, P, D)
        py = px if y is None else unfold_patches(y[i : i + step], geo)
        part = torch.bmm(px.transpose(1, 2), py)
        xxT = part if xxT is None else xxT + part
        s_ = px.sum(1)
        x_sum = s_ if x_sum is None else x_sum + s_
        count += px.shape[1]
    return xxT, x_sum, count


def _space_to_depth_blocks(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None):
    """Moments of a strided conv with few channels via space-to-depth (groups = 1).

    Folding every ``s_h x s_w`` cell of the padded input into channels turns the conv into a
    stride-1 conv with ``C s_h s_w`` channels and a ``ceil((d (k-1) + 1) / s)`` kernel whose patch
    contains the original one; its Sigma (lag method, wider GEMMs) restricted to the original taps
    is the original Sigma. Returns the dense ``(1, D, D)`` matrix.
    """
    if geo.groups != 1:
        raise ValueError("space-to-depth moments need groups = 1")
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    xp = _pad(x, geo)
    yp = None if y is None else _pad(y, geo)
    hp, wp = xp.shape[-2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    kh2, kw2 = -(-(dh * (kh - 1) + 1) // sh), -(-(dw * (kw - 1) + 1) // sw)
    rows, cols = (ho + kh2 - 1) * sh, (wo + kw2 - 1) * sw  # exactly what the output positions use

    def fold(t):
        t = t[..., :rows, :cols]
        t = F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))
        return F.pixel_unshuffle(t, sh) if sh == sw else _unshuffle2(t, sh, sw)

    c = x.shape[1]
    geo2 = ConvGeometry(in_channels=c * sh * sw, kernel_size=(kh2, kw2), stride=(1, 1), pad=(0, 0, 0, 0),
                        dilation=(1, 1), groups=1, padding_mode="zeros")
    big, big_sum, count = conv_input_moments(fold(xp), geo2, method="lag", y=None if yp is None else fold(yp))
    # Original tap (c, i, j) sits at padded offset (dh i, dw j) = (sh qi + ri, sw qj + rj):
    # channel c*sh*sw + ri*sw + rj of the folded input, kernel position (qi, qj).
    idx = []
    for ch in range(c):
        for i in range(kh):
            qi, ri = divmod(dh * i, sh)
            for j in range(kw):
                qj, rj = divmod(dw * j, sw)
                idx.append(((ch * sh * sw + ri * sw + rj) * kh2 + qi) * kw2 + qj)
    idx_t = torch.tensor(idx, device=x.device)
    return big[:, idx_t][:, :, idx_t], big_sum[:, idx_t], count


def _unshuffle2(t: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
    """``pixel_unshuffle`` with different factors per axis: ``(N, C, H, W) -> (N, C sh sw, H/sh, W/sw)``."""
    n, c, h, w = t.shape
    t = t.reshape(n, c, h // sh, sh, w // sw, sw).permute(0, 1, 3, 5, 2, 4)
    return t.reshape(n, c * sh * sw, h // sh, w // sw)


def conv_input_moments(
    x: torch.Tensor,
    geo: ConvGeometry,
    compute_dtype: torch.dtype | None = None,
    method: str = "auto",
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact ``(sum x x^T, sum x, count)`` over all patches a Conv2d sees in the batch ``x``.

    Same arguments as :func:`conv_moment_blocks`; returns the dense ``(g, D, D)`` matrix.
    """
    parts, x_sum, count = conv_moment_blocks(x, geo, compute_dtype, method, y)
    if isinstance(parts, torch.Tensor):
        return parts, x_sum, count
    return assemble_blocks(parts, geo, symmetric=y is None, like=x_sum), x_sum, count


def assemble_blocks(blocks: dict, geo: ConvGeometry, symmetric: bool, like: torch.Tensor) -> torch.Tensor:
    """``(g, D, D)`` from Sigma's ``(a, b)`` offset blocks (missing blocks are zero; with
    ``symmetric`` only ``a <= b`` is given and ``(b, a)`` is the transpose)."""
    g = geo.groups
    cg = geo.in_channels // g
    kk = geo.kernel_size[0] * geo.kernel_size[1]
    full = like.new_zeros(g, kk, kk, cg, cg)
    for (ia, ib), blk in blocks.items():
        full[:, ia, ib] = blk
        if symmetric and ia != ib:
            full[:, ib, ia] = blk.transpose(1, 2)
    # Reorder to unfold order: D index = c*kk + offset.
    return full.permute(0, 3, 1, 4, 2).reshape(g, cg * kk, cg * kk)


def conv_moment_blocks(
    x: torch.Tensor,
    geo: ConvGeometry,
    compute_dtype: torch.dtype | None = None,
    method: str = "auto",
    y: torch.Tensor | None = None,
):
    """Sigma of the patches a Conv2d sees in ``x``, as offset blocks: ``(blocks, sum x, count)``.

    ``blocks`` maps a pair of kernel offsets ``(a, b)`` (flattened row-major, ``a <= b`` unless
    ``y`` is given) to ``sum_p X[p + a] Y[p + b]^T`` of shape ``(g, Cg, Cg)``; pairs whose windows
    only ever meet zero padding are left out. The unfold method returns the dense
    ``(g, D, D)`` matrix instead of a dict. Accumulating blocks and assembling once
    (:func:`assemble_blocks`) avoids a ``D x D`` pass per batch.

    With ``y`` (same shape as ``x``, e.g. the input the same layer sees in a partly compressed
    model) the first result is the cross moment ``sum x y^T`` instead (patches of ``x`` and ``y``
    at the same output position).

    Args:
        x: conv input ``(N, S, H, W)`` (or ``(S, H, W)``).
        geo: the conv's geometry (:func:`conv_geometry`).
        compute_dtype: dtype of the GEMMs; default float32 for half / float32 inputs and
            float64 for float64 inputs.
        method: ``"lag"`` (shifted-window products, see the module docstring), ``"unfold"``
            (explicit patches, cheaper when there are few channels per group, e.g. an RGB stem
            or a depthwise conv) or ``"auto"``. ``"lag-whole"`` / ``"lag-cells"`` force one of
            the lag method's two exact ways of summing a window (for tests).

    Returns:
        ``xxT (g, D, D)``, ``x_sum (g, D)`` in ``compute_dtype`` and the number of patches per
        group. The caller adds them into float64 accumulators.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
        y = None if y is None else y.unsqueeze(0)
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute_dtype)
    if y is not None:
        if y.shape != x.shape:
            raise ValueError(f"cross moments need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        y = y.to(compute_dtype)
    g = geo.groups
    kh, kw = geo.kernel_size
    cg = x.shape[1] // g
    if method == "auto":
        if kh * kw == 1 or cg >= 8:
            method = "lag"
        elif g == 1 and geo.stride != (1, 1) and cg * geo.stride[0] * geo.stride[1] >= 8:
            method = "lag-s2d"  # e.g. an RGB stem with stride 2: 12 channels after space-to-depth
        else:
            method = "unfold"
    if method == "unfold":
        return _unfold_moments(x, geo, y)
    if method == "lag-s2d":
        return _space_to_depth_blocks(x, geo, y)
    if method not in ("lag", "lag-whole", "lag-cells"):
        raise ValueError(f"unknown moment method {method!r}")
    strategy = {"lag": "auto", "lag-whole": "whole", "lag-cells": "cells"}[method]

    sh, sw = geo.stride
    dh, dw = geo.dilation
    n = x.shape[0]
    top, bottom, left, right = geo.pad
    zero_pad = geo.padding_mode == "zeros"
    # Zero padding is never materialised: the phase buffers are zero-filled and the input is
    # copied into their interior. Other padding modes pad first.
    xp = x if zero_pad else _pad(x, geo)
    yp = (x if y is None else y) if zero_pad else (xp if y is None else _pad(y, geo))
    hp = x.shape[2] + top + bottom
    wp = x.shape[3] + left + right
    rows, ho = _axis_plan(hp, kh, sh, dh)
    cols, wo = _axis_plan(wp, kw, sw, dw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel for {geo}")
    # Every phase sub-image X[fr::sh, fc::sw] goes, channels-last and zero-filled to a common
    # (hs, ws) grid, into a flat (front + N*hs*ws + back, g, Cg) buffer. A lag is then a shift of
    # the flat index, and the product over *all* positions is one GEMM on two views, no copies.
    hs, ws = -(-hp // sh), -(-wp // sw)
    m = n * hs * ws
    kk = kh * kw
    offsets = [(i, j) for i in range(kh) for j in range(kw)]
    groups_of_pairs: dict[tuple, list[tuple[int, int]]] = {}
    # Sigma is symmetric: blocks a <= b suffice. A cross moment needs every ordered pair.
    if y is None:
        all_pairs = itertools.combinations_with_replacement(range(kk), 2)
    else:
        all_pairs = itertools.product(range(kk), repeat=2)
    for ia, ib in all_pairs:
        (ai, aj), (bi, bj) = offsets[ia], offsets[ib]
        key = (rows[ai][0], cols[aj][0], rows[bi][0], cols[bj][0],
               rows[bi][1] - rows[ai][1], cols[bj][1] - cols[aj][1])
        groups_of_pairs.setdefault(key, []).append((ia, ib))
    shifts = [lag_i * ws + lag_j for (*_, lag_i, lag_j) in groups_of_pairs]
    front, back = max(0, -min(shifts)), max(0, max(shifts))
    bufs: dict[tuple[int, int, bool], torch.Tensor] = {}
    real = (top, top + x.shape[2]), (left, left + x.shape[3])  # input rows / cols inside padding

    def real_range(phase: int, axis: int) -> tuple[int, int]:
        """Sub-grid indices ``m`` whose padded position ``phase + stride*m`` is not zero padding."""
        s_ = (sh, sw)[axis]
        size = (hs, ws)[axis]
        if geo.padding_mode != "zeros":
            return 0, size
        lo, hi = real[axis]
        return max(0, -(-(lo - phase) // s_)), min(size, -(-(hi - phase) // s_))

    def phase_buffer(fr: int, fc: int, second: bool = False) -> torch.Tensor:
        key = (fr, fc, second and y is not None)
        if key not in bufs:
            buf = x.new_zeros(front + m + back, g, cg)
            grid = buf[front : front + m].view(n, hs, ws, g, cg)
            src = yp if key[2] else xp
            if zero_pad:  # sub-grid index m <-> input row fr + sh*m - top
                (r0, r1), (c0, c1) = real_range(fr, 0), real_range(fc, 1)
                sub = src[:, :, fr + sh * r0 - top :: sh, fc + sw * c0 - left :: sw][:, :, : r1 - r0, : c1 - c0]
            else:
                r0, c0 = 0, 0
                sub = src[:, :, fr::sh, fc::sw]
            hh, ww = sub.shape[2], sub.shape[3]
            grid[:, r0 : r0 + hh, c0 : c0 + ww] = sub.permute(0, 2, 3, 1).reshape(n, hh, ww, g, cg)
            bufs[key] = buf
        return bufs[key]

    blocks: dict[tuple[int, int], torch.Tensor] = {}
    for (fai, faj, fbi, fbj, lag_i, lag_j), pairs in groups_of_pairs.items():
        shift = lag_i * ws + lag_j
        buf_a, buf_b = phase_buffer(fai, faj), phase_buffer(fbi, fbj, second=True)
        flat_a = buf_a[front : front + m]
        flat_b = buf_b[front + shift : front + shift + m]
        grid_a = flat_a.view(n, hs, ws, g, cg)
        grid_b = flat_b.view(n, hs, ws, g, cg)
        starts = {(rows[offsets[ia][0]][1], cols[offsets[ia][1]][1]) for ia, _ in pairs}
        cuts_i = sorted({0, hs} | {o for o, _ in starts} | {o + ho for o, _ in starts})
        cuts_j = sorted({0, ws} | {o for _, o in starts} | {o + wo for _, o in starts})
        cells = [(r0, r1, c0, c1) for r0, r1 in zip(cuts_i, cuts_i[1:])
                 for c0, c1 in zip(cuts_j, cuts_j[1:])]

        def inside(cell, start):
            r0, r1, c0, c1 = cell
            return start[0] <= r0 and r1 <= start[0] + ho and start[1] <= c0 and c1 <= start[1] + wo

        # Products vanish where either side is zero padding: shrink each cell to where both
        # A and the lag-shifted B hold real input (skips most of the work on small maps).
        ra, ca = real_range(fai, 0), real_range(faj, 1)
        rb, cb = real_range(fbi, 0), real_range(fbj, 1)
        lo_i, hi_i = max(ra[0], rb[0] - lag_i), min(ra[1], rb[1] - lag_i)
        lo_j, hi_j = max(ca[0], cb[0] - lag_j), min(ca[1], cb[1] - lag_j)

        def live(cell, both=True):
            # Outside every window the lag-shifted flat view of B may wrap into the next row,
            # so there only A's zeros may be skipped ("both=False").
            li, hi_, lj, hj = (lo_i, hi_i, lo_j, hi_j) if both else (ra[0], ra[1], ca[0], ca[1])
            r0, r1, c0, c1 = cell
            r0, r1, c0, c1 = max(r0, li), min(r1, hi_), max(c0, lj), min(c1, hj)
            return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None

        def area(cell, both=True):
            cell = live(cell, both)
            return 0 if cell is None else (cell[1] - cell[0]) * (cell[3] - cell[2])

        def cell_product(cell, both=True):
            r0, r1, c0, c1 = live(cell, both)
            pa = grid_a[:, r0:r1, c0:c1].reshape(-1, g, cg)
            pb = grid_b[:, r0:r1, c0:c1].reshape(-1, g, cg)
            return _lag_products(pa, pb)

        # Two exact ways to get each window's sum; take the one that touches fewer positions:
        #  "whole": one copy-free GEMM over the whole flat grid, minus the cells outside the window
        #  "cells": add up the cells inside the window (each cell gathered once, shared).
        in_some = [c for c in cells if any(inside(c, st) for st in starts) and area(c)]
        in_all = [c for c in cells if all(inside(c, st) for st in starts)]
        # Cost in multiply-adds: a GEMM row costs cg^2; gathering a cell copies 2 cg floats a
        # position, measured at about 30 multiply-adds a float (strided copies are slow
        # against the GEMM, which matters for few channels).
        gemm, gathered = cg * cg, cg * cg + 60 * cg
        cost_whole = hs * ws * gemm + gathered * sum(area(c, False) for c in cells if c not in in_all)
        cost_cells = gathered * sum(area(c) for c in in_some)
        if strategy != "auto":
            cost_whole, cost_cells = (0, 1) if strategy == "whole" else (1, 0)
        window = {}
        if cost_whole < cost_cells:
            total = _lag_products(flat_a, flat_b)
            outside = {c: cell_product(c, False) for c in cells if c not in in_all and area(c, False)}
            for st in starts:
                acc = total
                for cell, val in outside.items():
                    if not inside(cell, st):
                        acc = acc - val
                window[st] = acc
        else:
            parts = {c: cell_product(c) for c in in_some}
            for st in starts:
                terms = [val for cell, val in parts.items() if inside(cell, st)]
                if terms:
                    window[st] = torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]
        for ia, ib in pairs:
            acc = window.get((rows[offsets[ia][0]][1], cols[offsets[ia][1]][1]))
            if acc is not None:
                blocks[(ia, ib)] = acc

    # Sum of patches: per offset, the sum over its window.
    x_sum = x.new_empty(g, kk, cg)
    image_sums = {}  # per phase: the batch summed once, (hs, ws, g, cg)
    for idx, (i, j) in enumerate(offsets):
        (fi, oi), (fj, oj) = rows[i], cols[j]
        if (fi, fj) not in image_sums:
            image_sums[(fi, fj)] = phase_buffer(fi, fj)[front : front + m].view(n, hs, ws, g, cg).sum(0)
        x_sum[:, idx] = image_sums[(fi, fj)][oi : oi + ho, oj : oj + wo].sum(dim=(0, 1))
    x_sum = x_sum.transpose(1, 2).reshape(g, cg * kk)
    return blocks, x_sum, n * ho * wo


def linear_input_moments(
    x: torch.Tensor, compute_dtype: torch.dtype | None = None, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(sum x x^T (1, D, D), sum x (1, D), count)`` for a Linear input of any leading shape.

    Every vector along the last dimension (every token of a ``(B, L, D)`` input) is a sample.
    With ``y`` (same shape) the first result is the cross moment ``sum x y^T``.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    other = flat if y is None else y.reshape(-1, y.shape[-1]).to(compute_dtype)
    return (flat.T @ other).unsqueeze(0), flat.sum(0).unsqueeze(0), flat.shape[0]
