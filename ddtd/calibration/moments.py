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

**Fewer multiplications.** The lag products ``R(d) = sum_q X[q] X[q + d]^T`` over a box of lags
``d`` are a correlation of the image with itself, so the fast-convolution trick applies with
the roles swapped: cut the positions ``q`` into ``m x m`` tiles; per tile, the lags are the 2-D
correlation of the tile (``u``) with the patch of ``X`` it meets (``v``), which Toom-Cook /
Winograd transforms compute from ``K = (m + r_i - 1)(m + r_j - 1)`` pointwise products
``(G u)_k (B v)_k^T``. Summed over tiles each is one ``C x C`` GEMM, and the inverse transform
``A`` is applied once per batch (:func:`fast_correlation`, :func:`toom_cook_matrices`). For a
3x3 conv (lags ``3 x 5`` after using ``R(-d) = R(d)^T``) and 4x4 tiles that is
``6*8/16 = 3`` GEMM rows per position instead of 13. The totals run over the whole image (zero
outside), so each window is then corrected exactly by subtracting the products of the border
cells outside it. The transforms are exact in rational arithmetic (float64 results equal
explicit unfolding to 1e-12) and, with the points ``0, +-1, +-2, +-1/2, inf``, as accurate as
the direct GEMMs in float32.

**Other layers.** 1x1 and strided convs gather their patches as a ``(D, positions)`` matrix a
few images at a time (:func:`_gathered_moments`), and convs on tiny maps (at most 16 positions,
the last stages of a network on 32 px images) take Sigma from the second moment of the whole
input (:func:`_dense_moments`). Both, and Linear layers, are large GEMMs whose summed dimension
is contiguous, which oneDNN runs about twice as fast as torch's default CPU GEMM
(:func:`_onednn_gemm`; benchmarks/results/calibrate.txt).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

__all__ = [
    "ConvGeometry",
    "conv_geometry",
    "conv_input_moments",
    "conv_moment_blocks",
    "assemble_blocks",
    "fast_correlation",
    "toom_cook_matrices",
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


def _out_size(size_padded: int, k: int, s: int, d: int) -> int:
    """Output length along one axis of a conv (kernel ``k``, stride ``s``, dilation ``d``)."""
    return (size_padded - d * (k - 1) - 1) // s + 1


def _axis_plan(size_padded: int, k: int, s: int, d: int):
    """Per kernel offset along one axis: (phase, offset) on the stride lattice, and output length."""
    out = _out_size(size_padded, k, s, d)
    plan = [divmod(d * a, s)[::-1] for a in range(k)]  # (phase f, offset o) with d*a = s*o + f
    return plan, out


#: Values of the phase buffers (all of them, float32) that one chunk of the whole-grid lag
#: products reads: about 1 MiB, an L2 cache.
WHOLE_CHUNK_VALUES = 1 << 18


def _lag_products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_m a[m]^T b[m]`` per group: ``(M, g, Cg) x (M, g, Cg) -> (g, Cg, Cg)``, no copies
    (added into ``out`` when given)."""
    if a.shape[1] == 1:
        if out is not None:
            out[0].addmm_(a[:, 0].T, b[:, 0])
            return out
        return (a[:, 0].T @ b[:, 0]).unsqueeze(0)
    if a.shape[2] == 1:  # depthwise: one number per group
        res = (a[:, :, 0] * b[:, :, 0]).sum(0).reshape(-1, 1, 1)
        return res if out is None else out.add_(res)
    if out is not None:
        return out.baddbmm_(a.permute(1, 2, 0), b.permute(1, 0, 2))
    return torch.bmm(a.permute(1, 2, 0), b.permute(1, 0, 2))


@functools.cache
def _onednn_gemm():
    """oneDNN's float32 matmul ``X @ W^T`` when this torch build has it, else ``None``.

    On the CPU measured (AMD EPYC with AVX-512, one thread) torch's default float32 GEMM (MKL)
    ran the moment products at 40-48 GMAC/s and oneDNN at 77-105, both to float32 rounding;
    oneDNN is fast only when both operands have the summed dimension contiguous.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        probe = torch.arange(6, dtype=torch.float32).view(2, 3)
        if not torch.equal(op(probe, probe, None, "none", [None], ""), probe @ probe.T):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for ``a (M, K)`` and ``b (N, K)`` with ``K`` contiguous: oneDNN for float32
    on the CPU (:func:`_onednn_gemm`), else ``torch.mm``."""
    op = _onednn_gemm() if a.device.type == "cpu" and a.dtype == torch.float32 else None
    if op is not None:
        return op(a.contiguous(), b.contiguous(), None, "none", [None], "")
    return a @ b.T


#: ``auto`` computes a k x k conv's moments from the second moment of its whole input
#: (:func:`_dense_moments`) when the input map has at most this many positions (after padding
#: for non-zero padding modes) and ``Cg * H * W`` is at most :data:`DENSE_MAX_DIM`.
DENSE_MAX_POSITIONS = 16
DENSE_MAX_DIM = 4096


@functools.lru_cache(maxsize=256)
def _dense_plan(geo: ConvGeometry, h: int, w: int, symmetric: bool):
    """Index plan of :func:`_dense_moments` for an ``h x w`` input (after padding for non-zero
    padding modes): block keys, the number of pieces ``(u, v)``, the selection matrices
    ``(keys, pieces)`` (symmetric: ``(keys, 2 pieces)``, the pieces and then their transposes)
    and ``(kh kw, h w)`` for the sums, and the number of output positions."""
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    top, bottom, left, right = geo.pad if geo.padding_mode == "zeros" else (0, 0, 0, 0)
    ho, wo = _out_size(h + top + bottom, kh, sh, dh), _out_size(w + left + right, kw, sw, dw)
    q_count, kk = h * w, kh * kw
    tap = []  # per offset, per output position: the input position it reads (None: padding)
    for a in range(kk):
        ai, aj = divmod(a, kw)
        rows = [sh * pi + dh * ai - top for pi in range(ho)]
        cols = [sw * pj + dw * aj - left for pj in range(wo)]
        tap.append([r * w + col if 0 <= r < h and 0 <= col < w else None for r in rows for col in cols])
    piece_ids = {}
    for u in range(q_count):
        for v in range(u if symmetric else 0, q_count):
            piece_ids[(u, v)] = len(piece_ids)
    pairs = (itertools.combinations_with_replacement(range(kk), 2) if symmetric
             else itertools.product(range(kk), repeat=2))
    keys, entries = [], []
    for ia, ib in pairs:
        valid = [(u, v) for u, v in zip(tap[ia], tap[ib]) if u is not None and v is not None]
        if valid:
            for u, v in valid:
                if (u, v) in piece_ids:
                    entries.append((0, len(keys), piece_ids[(u, v)]))
                else:
                    entries.append((1, len(keys), piece_ids[(v, u)]))
            keys.append((ia, ib))
    # Columns: the pieces, then (symmetric case) the same pieces transposed.
    select = torch.zeros(len(keys), (2 if symmetric else 1) * len(piece_ids), dtype=torch.float64)
    for side, k, piece in entries:
        select[k, side * len(piece_ids) + piece] += 1
    select_sum = torch.zeros(kk, q_count, dtype=torch.float64)
    for a in range(kk):
        for q in tap[a]:
            if q is not None:
                select_sum[a, q] += 1
    return keys, len(piece_ids), select, select_sum, ho * wo


def _dense_moments(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None):
    """Moments of a conv on a tiny feature map from the second moment of its whole input.

    Flatten one group's input per image as ``X (Q Cg, N)`` (``Q`` input positions, after
    padding for non-zero padding modes); ``M = X X^T`` holds the ``(Cg, Cg)`` product of every
    pair of positions ``u, v``, and Sigma's block ``(a, b)`` is the sum of the pieces
    ``(q_a(p), q_b(p))`` over the output positions ``p`` whose taps are not zero padding. Only
    the pieces ``u <= v`` are computed (``M[v, u] = M[u, v]^T``), one GEMM per ``u``; the
    blocks are then one small GEMM selecting pieces and their transposes. For a 3x3 conv on a
    2x2 map that is ``10 Cg^2`` multiply-adds an image against ``9 * 16 Cg^2`` for the lag
    products on the padded grid, in large GEMMs (measured, one thread, 512 images: 2x2 maps
    1.4-1.7x faster, 1x1 2x, 4x4 1.0-1.15x). Returns the same ``(blocks, sum x, count)`` as the
    lag methods.
    """
    if geo.padding_mode != "zeros":  # padded copies of real values: pad, then no zero taps
        x = _pad(x, geo)
        y = None if y is None else _pad(y, geo)
    n, c, h, w = x.shape
    g = geo.groups
    cg, q_count = c // g, h * w
    symmetric = y is None
    keys, n_pieces, select, select_sum, positions = _dense_plan(geo, h, w, symmetric)
    if positions <= 0:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel for {geo}")
    select, select_sum = select.to(x), select_sum.to(x)
    blocks_t = x.new_empty(len(keys), g, cg, cg)
    x_sum = x.new_empty(g, cg, geo.kernel_size[0] * geo.kernel_size[1])
    pieces = x.new_empty(select.shape[1], cg, cg)

    def flat(t, grp):  # (Q Cg, N): positions outer, channels inner, images contiguous
        return t[:, grp * cg : (grp + 1) * cg].permute(2, 3, 1, 0).reshape(q_count * cg, n).contiguous()

    for grp in range(g):
        xt = flat(x, grp)
        yt = xt if symmetric else flat(y, grp)
        first = 0
        for u in range(q_count):
            v0 = u if symmetric else 0
            row = _gram(xt[u * cg : (u + 1) * cg], yt[v0 * cg :])  # (Cg, (Q - v0) Cg)
            pieces[first : first + q_count - v0] = row.view(cg, q_count - v0, cg).transpose(0, 1)
            first += q_count - v0
        if symmetric:
            pieces[n_pieces:] = pieces[:n_pieces].transpose(1, 2)
        blocks_t[:, grp] = (select @ pieces.view(-1, cg * cg)).view(-1, cg, cg)
        x_sum[grp] = xt.sum(1).view(q_count, cg).T @ select_sum.T
    blocks = {key: blocks_t[i] for i, key in enumerate(keys)}
    return blocks, x_sum.reshape(g, -1), n * positions


def _unfold_moments(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None,
                    max_elems: int = 1 << 16):
    """Moments by explicit unfolding, a few images at a time (at most ``max_elems`` values, or
    one image: small chunks stay in cache; on depthwise 3x3 convs 2^16 instead of 2^26 values
    took the moments from 12-19x to 2.5-5x the conv's time, one thread)."""
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


def _gathered_moments(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None,
                      chunk_values: int = 1 << 19):
    """Moments of a ``groups = 1`` conv from explicit patches, a few images at a time.

    Each chunk is one strided copy of the patches as a ``(D, positions)`` matrix in the unfold
    order (``D = C kh kw`` rows, positions contiguous: the layout oneDNN's GEMM is fast on, see
    :func:`_onednn_gemm`) and its Gram matrix, three quarters of it (the two diagonal blocks
    and one off-diagonal block of a 2 x 2 split; the other is its transpose). Chunks of about
    ``chunk_values`` values stay in cache. ``auto`` uses it for 1x1 convs (no duplication:
    the patches are the input) and strided convs (the lag products split into stride phases
    with little reuse; an RGB stem's are many tiny GEMMs). Returns the dense ``(1, D, D)``
    matrix.
    """
    if geo.groups != 1:
        raise ValueError("gathered moments need groups = 1")
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    xp = _pad(x, geo)
    yp = None if y is None else _pad(y, geo)
    n, c, hp, wp = xp.shape
    ho, wo = _out_size(hp, kh, sh, dh), _out_size(wp, kw, sw, dw)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the kernel for {geo}")
    dim, per_image = c * kh * kw, ho * wo
    step = max(1, chunk_values // (dim * per_image))

    def patches(t, i, buf):  # (D, m * ho * wo) patches of images i .. i + step - 1
        part = t[i : i + step]
        s_n, s_c, s_h, s_w = part.stride()
        view = part.as_strided((c, kh, kw, part.shape[0], ho, wo),
                               (s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw))
        out = buf[:, : part.shape[0] * per_image]
        out.view(view.shape).copy_(view)
        return out

    buf_x = x.new_empty(dim, min(step, n) * per_image)
    buf_y = None if y is None else x.new_empty(dim, min(step, n) * per_image)
    xxT = x.new_zeros(dim, dim)
    x_sum = x.new_zeros(dim)
    h = dim // 2
    for i in range(0, n, step):
        px = patches(xp, i, buf_x)
        x_sum += px.sum(1)
        if y is not None:
            xxT += _gram(px, patches(yp, i, buf_y))
        elif h < 64:
            xxT += _gram(px, px)
        else:
            top, bottom = px[:h], px[h:]
            xxT[:h, :h] += _gram(top, top)
            xxT[:h, h:] += _gram(top, bottom)
            xxT[h:, h:] += _gram(bottom, bottom)
    if y is None and h >= 64:
        xxT[h:, :h] = xxT[:h, h:].T
    return xxT.unsqueeze(0), x_sum.unsqueeze(0), n * per_image


def _space_to_depth_blocks(x: torch.Tensor, geo: ConvGeometry, y: torch.Tensor | None = None,
                           inner: str = "lag"):
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
    ho, wo = _out_size(hp, kh, sh, dh), _out_size(wp, kw, sw, dw)
    kh2, kw2 = -(-(dh * (kh - 1) + 1) // sh), -(-(dw * (kw - 1) + 1) // sw)
    rows, cols = (ho + kh2 - 1) * sh, (wo + kw2 - 1) * sw  # exactly what the output positions use

    def fold(t):
        t = t[..., :rows, :cols]
        t = F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))
        return F.pixel_unshuffle(t, sh) if sh == sw else _unshuffle2(t, sh, sw)

    c = x.shape[1]
    geo2 = ConvGeometry(in_channels=c * sh * sw, kernel_size=(kh2, kw2), stride=(1, 1), pad=(0, 0, 0, 0),
                        dilation=(1, 1), groups=1, padding_mode="zeros")
    big, big_sum, count = conv_input_moments(fold(xp), geo2, method=inner, y=None if yp is None else fold(yp))
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


# -- fast (Toom-Cook / Winograd) lag correlations ------------------------------------------------

#: Evaluation points of the Toom-Cook transforms (plus the point at infinity). The first ones
#: give the smallest float32 error; 8 points (tiles of 4 for 5 lags) stay close to direct GEMMs.
_TOOM_POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))
MAX_TOOM_POINTS = len(_TOOM_POINTS) + 1
#: Chunking of :func:`fast_correlation` (values of transformed tiles per chunk; see there).
_PRODS_FACTOR = 1
_CHUNK_VALUES = 1 << 21


def _vandermonde(points, n: int) -> list[list[Fraction]]:
    """Rows ``[1, p, ..., p^(n-1)]`` per finite point; the point at infinity (``None``) picks
    the leading coefficient ``e_(n-1)``."""
    return [[Fraction(int(e == n - 1)) for e in range(n)] if p is None else [p**e for e in range(n)]
            for p in points]


def _exact_inverse(mat: list[list[Fraction]]) -> list[list[Fraction]]:
    """Gauss-Jordan inverse in exact rational arithmetic (tiny matrices only)."""
    n = len(mat)
    a = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(mat)]
    for c in range(n):
        p = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[p] = a[p], a[c]
        piv = a[c][c]
        a[c] = [v / piv for v in a[c]]
        for r in range(n):
            if r != c and a[r][c] != 0:
                f = a[r][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return [row[n:] for row in a]


@functools.lru_cache(maxsize=None)
def toom_cook_matrices(m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact transforms ``(G (a, m), B (a, a), A (a, r))``, ``a = m + r - 1``, of the correlation

        y_d = sum_{i<m} u_i v_(i+d),   d = 0..r-1,   v of length a,

    as ``y = A^T [(G u) * (B v)]`` with ``a`` pointwise products instead of ``m r``. It is the
    transpose of Toom-Cook linear convolution: with ``V_n`` the ``a x n`` Vandermonde matrix of
    the points (the point at infinity selects the leading coefficient), the convolution
    ``s = g * h`` of lengths ``m`` and ``r`` is ``s = V_a^-1 [(V_m g) * (V_r h)]``, so the trilinear
    form ``sum_d y_d z_d = sum_(i,d) u_i z_d v_(i+d) = sum_k (V_m u)_k (V_r z)_k (V_a^-T v)_k`` gives
    ``G = V_m``, ``A = V_r``, ``B = V_a^-T``. ``m = 1`` is the identity form (``a = r``,
    ``G = 1``, ``A = B = I``). Computed in rational arithmetic, returned as float64.
    """
    if m < 1 or r < 1 or m + r - 1 > MAX_TOOM_POINTS:
        raise ValueError(f"no Toom-Cook transform for tiles of {m} and {r} lags (at most {MAX_TOOM_POINTS} points)")
    if m == 1:
        eye = torch.eye(r, dtype=torch.float64)
        return torch.ones(r, 1, dtype=torch.float64), eye, eye.clone()
    a = m + r - 1
    points = list(_TOOM_POINTS[: a - 1]) + [None]
    inv = _exact_inverse(_vandermonde(points, a))

    def tensor(rows):
        return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)

    return tensor(_vandermonde(points, m)), tensor(inv).T.contiguous(), tensor(_vandermonde(points, r))


def _mix(mat: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``mat @ x`` for a small ``(p, k)`` transform and a long ``(k, L)`` matrix (into ``out``)."""
    if out is None:
        return torch.matmul(mat, x)
    return torch.matmul(mat, x, out=out)


def fast_tiles(size: int, lags: int) -> int:
    """Tile length along one axis for :func:`fast_correlation`: the ``m`` minimising the
    transformed length ``ceil(size/m) (m + lags - 1)`` (``m = 1``: no transform)."""
    best = min(range(1, MAX_TOOM_POINTS - lags + 2),
               key=lambda m: (-(-size // m) * (m + lags - 1), m + lags - 1))
    return best


def _fast_plan(h: int, w: int, ri: int, rj: int, n: int, cg: int, g: int):
    """Tiles ``(m_i, m_j)`` for :func:`fast_correlation` on ``h x w`` images with ``ri x rj``
    lags, and its estimated cost in multiply-adds per image and group (``None`` when the lag
    range needs more than :data:`MAX_TOOM_POINTS` points).

    Per transformed tile position: ``K = (m_i + r_i - 1)(m_j + r_j - 1)`` GEMM rows of ``cg^2``
    plus the transforms (about ``80 cg``, measured); per batch, the ``K`` accumulated products
    cost about 64 GEMM rows each (memory traffic) plus the inverse transform; per input
    position, the channels-last copies (about ``120 cg``).
    """
    if max(ri, rj) > MAX_TOOM_POINTS:
        return None
    best = None
    for mi in range(1, MAX_TOOM_POINTS - ri + 2):
        for mj in range(1, MAX_TOOM_POINTS - rj + 2):
            k = (mi + ri - 1) * (mj + rj - 1)
            cost = (-(-h // mi) * -(-w // mj) * k * (cg * cg + 80 * cg) + k * cg * cg * (64 + 4 * ri * rj) / n
                    + 120 * cg * h * w)
            if best is None or cost < best[1]:
                best = ((mi, mj), cost)
    return best


class _Scratch:
    """Reusable work buffers: ``get(name, shape)`` returns a view of a buffer that grows to the
    largest request. Tensors allocated fresh for every chunk of images page-fault on first
    write: a 3 MB strided copy into a fresh tensor took 1.3 ms, into a reused one 0.1 ms."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = self.like.new_empty(numel)
        return buf[:numel].view(tuple(shape))


def _channels_last_window(x: torch.Tensor, row0: int, rows: int, col0: int, cols: int,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``row0 .. row0 + rows - 1`` and columns ``col0 ..`` of ``x (N, C, H, W)`` as a
    channels-last ``(N, rows, cols, C)`` copy, zero outside ``x`` (only the margins are zeroed;
    written into ``out`` when given)."""
    n, c, h, w = x.shape
    out = x.new_empty(n, rows, cols, c) if out is None else out
    r0, r1 = max(0, row0), min(h, row0 + rows)
    c0, c1 = max(0, col0), min(w, col0 + cols)
    if r0 >= r1 or c0 >= c1:
        return out.zero_()
    out[:, : r0 - row0].zero_()
    out[:, r1 - row0 :].zero_()
    out[:, r0 - row0 : r1 - row0, : c0 - col0].zero_()
    out[:, r0 - row0 : r1 - row0, c1 - col0 :].zero_()
    out[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = x[:, :, r0:r1, c0:c1].permute(0, 2, 3, 1)
    return out


def fast_correlation(
    a: torch.Tensor,
    b: torch.Tensor,
    lag_lo: tuple[int, int],
    lag_hi: tuple[int, int],
    groups: int = 1,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """All lag cross-correlations ``R[d] = sum_q a[q] b[q + d]^T`` in a box of lags, fast.

    ``a (N, C, Ha, Wa)`` and ``b (N, C, Hb, Wb)`` are images that are zero outside their extent
    (so the sum runs over every ``q`` with both ``q`` and ``q + d`` inside), ``d`` ranges over
    ``[lag_lo[0], lag_hi[0]] x [lag_lo[1], lag_hi[1]]`` (``r_i x r_j`` lags), channels split into
    ``groups`` and only same-group products are formed. Returns ``(r_i, r_j, g, Cg, Cg)``.

    The positions ``q`` of ``a`` are cut into ``m_i x m_j`` tiles; per tile the lags are the 2-D
    correlation of the tile (``u``, the "filter") with the ``(m_i + r_i - 1) x (m_j + r_j - 1)``
    patch of ``b`` it meets (``v``), which the Toom-Cook transforms of
    :func:`toom_cook_matrices` (tensor product of both axes) turn into ``K = a_i a_j`` pointwise
    products: ``R = (A_i (x) A_j)^T [sum_tiles (G u)_k (B v)_k^T]_k``. Summed over tiles, each
    pointwise product is one ``Cg x Cg`` GEMM over ``N T_i T_j`` tiles, so a 3x3 conv's 15 lags
    (``3 x 5``) cost ``6*8/16 = 3`` GEMM rows per position with 4x4 tiles instead of 13. The
    inverse transform ``A`` is applied once to the summed products. The transforms are exact in
    rational arithmetic; in float32 the result is about as accurate as direct GEMMs (points
    ``0, +-1, +-2, +-1/2, inf``). ``tiles`` defaults to :func:`fast_tiles` per axis.
    """
    n, c, ha, wa = a.shape
    hb, wb = b.shape[2:]
    (li0, lj0), (li1, lj1) = lag_lo, lag_hi
    ri, rj = li1 - li0 + 1, lj1 - lj0 + 1
    if min(n, ha, wa, hb, wb) == 0:
        return a.new_zeros(ri, rj, groups, c // groups, c // groups)
    mi, mj = tiles if tiles is not None else (fast_tiles(ha, ri), fast_tiles(wa, rj))
    gi, bi, ai_ = toom_cook_matrices(mi, ri)
    gj, bj, aj_ = toom_cook_matrices(mj, rj)
    pi, pj = mi + ri - 1, mj + rj - 1
    ti, tj = -(-ha // mi), -(-wa // mj)
    dt = a.dtype
    k = pi * pj
    gi, gj, bi, bj = (t.to(a.device, dt) for t in (gi, gj, bi, bj))  # cached on the CPU
    wv = tj * mj + rj - 1  # columns lj0 .. Tj*mj + lj1 - 1 of b

    same = a is b and li0 <= 0 <= li1 and lj0 <= 0 <= lj1  # u's tiles lie inside v's buffer

    work = _Scratch(a)  # every chunk reuses the same buffers (no page faults per chunk)

    def gathered(name, view):
        """A copy of a strided view into a reused buffer."""
        return work.get(name, view.shape).copy_(view)

    def transformed(a, b, t0, tb):
        """``(G u, B v)`` of the tile rows ``t0 .. t0 + tb - 1`` of a few images, each
        ``(K, n tb Tj, C)`` (channels-last)."""
        n = a.shape[0]
        hv = tb * mi + ri - 1
        # v: b on the rows / columns the lags reach, channels-last (zero outside b).
        pb = _channels_last_window(b, li0 + t0 * mi, hv, lj0, wv, out=work.get("pb", (n, hv, wv, c)))
        if same:
            pa, s_i, s_j = pb, -li0, -lj0
        else:
            pa = _channels_last_window(a, t0 * mi, tb * mi, 0, tj * mj, out=work.get("pa", (n, tb * mi, tj * mj, c)))
            s_i, s_j = 0, 0
        # u: the tiles of a gathered as (mi, mj, n, tb, Tj, C), transformed axis by axis.
        s_n, s_h, s_w, s_c = pa.stride()
        u = gathered("u", pa[:, s_i:, s_j:].as_strided((mi, mj, n, tb, tj, c),
                                                      (s_h, s_w, s_n, mi * s_h, mj * s_w, s_c)))
        u = u.view(mi, mj, -1)
        length = u.shape[2]
        uj = work.get("uj", (mi, pj, length))
        for i in range(mi):
            _mix(gj, u[i], out=uj[i])
        ut = work.get("ut", (pi, pj, length))
        for jj in range(pj):
            _mix(gi, uj[:, jj], out=ut[:, jj])
        # v: the overlapping windows, gathered and transformed axis by axis: columns, then rows.
        s_n, s_h, s_w, s_c = pb.stride()
        win = gathered("win", pb.as_strided((pj, n, hv, tj, c), (s_w, s_n, s_h, mj * s_w, s_c))).view(pj, -1)
        y = _mix(bj, win, out=work.get("y", (pj, win.shape[1]))).view(pj, n, hv, tj, c)
        s = y.stride()
        win = gathered("win2", y.as_strided((pi, pj, n, tb, tj, c), (s[2], s[0], s[1], mi * s[2], s[3], s[4])))
        win = win.view(pi, -1)
        vt = _mix(bi, win, out=work.get("vt", (pi, win.shape[1])))
        return ut.view(k, n * tb * tj, c), vt.view(k, n * tb * tj, c)

    # Chunks of a few images, so that the transformed tiles (about 3x the input each) stay in
    # cache: on a shared memory bus these skinny products are bandwidth-bound. An image larger
    # than a chunk is cut into bands of tile rows (one 64-channel 56x56 image already needs
    # 12 MB of work buffers), so the working set is bounded for any input size. Each chunk also
    # reads and writes the K accumulated products, and every chunk costs some 20 op calls:
    # chunks of at least _CHUNK_VALUES values and at least _PRODS_FACTOR times the products'
    # size (a 512-channel 7x7 layer over 640 images: 1.2 s with these values, 1.4-1.8 s with
    # 2^22 and 4; a 64-channel 56x56 layer took 2.1x as long with 2^19 values; one thread).
    cg = c // groups
    per_row = c * (tj * (3 * k + mi * mj + mi * pj) + mi * wv + pj * mi * tj)  # values per tile row
    per_image = ti * per_row + c * (ri - 1) * (wv + pj * tj)
    want = max(_CHUNK_VALUES, _PRODS_FACTOR * k * groups * cg * cg)
    if per_image > want:
        step, band = 1, max(1, want // per_row)
    else:
        step, band = max(1, want // per_image), ti
    prods = a.new_zeros(k, groups, cg, cg)
    for s0 in range(0, n, step):
        a_part = a[s0 : s0 + step]
        b_part = a_part if same else b[s0 : s0 + step]
        for t0 in range(0, ti, band):
            ut, vt = transformed(a_part, b_part, t0, min(band, ti - t0))
            for grp in range(groups):
                sl = slice(grp * cg, (grp + 1) * cg)
                prods[:, grp].baddbmm_(ut[:, :, sl].transpose(1, 2), vt[:, :, sl])
    out = _mix(torch.kron(ai_, aj_).T.contiguous().to(a.device, dt), prods.view(k, -1))
    return out.view(ri, rj, groups, cg, cg)


def conv_input_moments(x: torch.Tensor, geo: ConvGeometry, compute_dtype: torch.dtype | None = None,
                       method: str = "auto", y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
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


def _dense_fits(x: torch.Tensor, geo: ConvGeometry) -> bool:
    """Whether ``auto`` takes :func:`_dense_moments` for input ``x``: a tiny map (at most
    :data:`DENSE_MAX_POSITIONS` positions, counted after padding for non-zero padding modes),
    ``Cg H W <= DENSE_MAX_DIM`` and at least 8 channels per group (a depthwise conv's groups
    would make as many small GEMMs: 576 channels @2x2 took 54 ms against 2.4 ms for the lag
    products)."""
    top, bottom, left, right = geo.pad
    positions = (x.shape[2] + top + bottom) * (x.shape[3] + left + right)
    if geo.padding_mode == "zeros":
        positions = x.shape[2] * x.shape[3]
    cg = x.shape[1] // geo.groups
    return cg >= 8 and positions <= DENSE_MAX_POSITIONS and cg * positions <= DENSE_MAX_DIM


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
        method: ``"auto"`` (default): ``"dense"`` for a k x k conv with at least 8 channels
            per group on a tiny input map (at most :data:`DENSE_MAX_POSITIONS` positions,
            :func:`_dense_moments`), ``"gather"`` for 1x1 convs (stride 1, or inputs of at least
            14x14) and strided convs with ``groups = 1``, ``"lag"`` for other convs with at least 8
            channels per group, else ``"unfold"``. ``"lag"`` (shifted-window products, see the module
            docstring) estimates, per layer geometry and batch, the multiply-adds of its two
            ways to get each lag's total (below) and takes the cheaper: ``"lag-fast"``, all lags
            of a pair of stride phases at once by :func:`fast_correlation` (Toom-Cook
            transformed tiles, about 3 instead of 13 GEMM rows per position for a 3x3 conv;
            wins for stride-1 convs with 64+ channels on maps of 7 or more) plus exact
            corrections on the border cells, or ``"lag-direct"``, one GEMM per lag (the
            previous default; wins for strided convs and tiny maps). ``"unfold"``: explicit
            patches, cheaper when there are few channels per group (a depthwise conv).
            ``"auto-direct"`` is the previous default (for benchmarks): ``"lag"`` without the
            fast correlations, ``"lag-s2d"`` (space-to-depth) for a strided conv with few
            channels (an RGB stem), else ``"unfold"``.
            ``"lag-whole"`` / ``"lag-cells"`` force one of the direct method's two exact ways
            of summing a window, ``"lag-fast"`` forces the fast one (raises ``ValueError`` when
            a lag range needs more than :data:`MAX_TOOM_POINTS` points, e.g. a dilated kernel);
            ``"gather"``: explicit patches as a ``(D, positions)`` matrix, a few images at a
            time, and oneDNN GEMMs (:func:`_gathered_moments`; groups = 1); ``"dense"``: from
            the second moment of the whole input (:func:`_dense_moments`);
            every method gives the same sums up to float rounding (for tests).

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
    inner = "lag"
    if method in ("auto", "auto-direct"):
        inner = "lag" if method == "auto" else "lag-direct"
        strided = geo.stride != (1, 1)
        if method == "auto" and kh * kw > 1 and _dense_fits(x, geo):
            method = "dense"
        elif method == "auto" and g == 1 and (kh * kw > 1 and strided or kh * kw == 1 and (
                not strided or x.shape[2] * x.shape[3] >= 4 * 49)):
            # Patches gathered as (D, positions) + oneDNN GEMMs: 2-3x faster than the lag
            # products for 1x1 convs, 1.2-1.4x for the strided 3x3 / 7x7 convs of a ResNet-18 at
            # 224 px (ties at 14x14 inputs), one thread. Not for a strided 1x1 conv on a small
            # map: the strided copy of 1-element runs cost more than the GEMM (8x8 input: 2x).
            method = "gather"
        elif kh * kw == 1 or cg >= 8:
            method = inner
        elif g == 1 and strided and cg * geo.stride[0] * geo.stride[1] >= 8:
            # e.g. an RGB stem with stride 2 (auto-direct): 12 channels after space-to-depth.
            method = "lag-s2d"
        else:
            method = "unfold"
    if method == "dense":
        return _dense_moments(x, geo, y)
    if method == "unfold":
        return _unfold_moments(x, geo, y)
    if method == "gather":
        return _gathered_moments(x, geo, y)
    if method == "lag-s2d":
        return _space_to_depth_blocks(x, geo, y, inner=inner)
    if method not in ("lag", "lag-whole", "lag-cells", "lag-fast", "lag-direct"):
        raise ValueError(f"unknown moment method {method!r}")
    strategy = {"lag": "auto", "lag-whole": "whole", "lag-cells": "cells", "lag-fast": "fast",
                "lag-direct": "direct"}[method]

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
            buf = x.new_empty(front + m + back, g, cg)
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
            # Zero only what the copy did not write (zeroing the whole buffer first cost 8-16%
            # of a layer's moment time): both ends, the rows and the columns around each image.
            buf[:front].zero_()
            buf[front + m :].zero_()
            grid[:, :r0].zero_()
            grid[:, r0 + hh :].zero_()
            grid[:, r0 : r0 + hh, :c0].zero_()
            grid[:, r0 : r0 + hh, c0 + ww :].zero_()
            bufs[key] = buf
        return bufs[key]

    def phase_image(fr: int, fc: int, second: bool) -> tuple[torch.Tensor, int, int]:
        """The part of phase sub-image ``(fr, fc)`` that is not zero padding, ``(N, C, h, w)``, and
        the sub-grid index of its first row / column."""
        src = yp if (second and y is not None) else xp
        if not zero_pad:
            return src[:, :, fr::sh, fc::sw], 0, 0
        (r0, r1), (c0, c1) = real_range(fr, 0), real_range(fc, 1)
        sub = src[:, :, fr + sh * r0 - top :: sh, fc + sw * c0 - left :: sw][:, :, : r1 - r0, : c1 - c0]
        return sub, r0, c0

    def plan(key, pairs):
        """Cells of one lag group and the cost (multiply-adds per image and group) of each way
        to sum its windows exactly."""
        fai, faj, fbi, fbj, lag_i, lag_j = key
        shift = lag_i * ws + lag_j
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

        in_some = [c for c in cells if any(inside(c, st) for st in starts) and area(c)]
        in_all = [c for c in cells if all(inside(c, st) for st in starts)]
        # Cost in multiply-adds: a GEMM row costs cg^2; gathering a cell copies 2 cg floats a
        # position, measured at about 30 multiply-adds a float (strided copies are slow
        # against the GEMM, which matters for few channels).
        gemm, gathered = cg * cg, cg * cg + 60 * cg
        return dict(
            key=key, pairs=pairs, shift=shift, starts=starts, cells=cells, inside=inside, live=live,
            in_some=in_some, in_all=in_all,
            # "whole": one copy-free GEMM over the flat grid minus every cell outside the window
            # (B's side may wrap there); "rim": a total from fast_correlation (true 2-D
            # correlation) minus the live cells outside the window; "cells": add up the cells
            # inside the window (each gathered once, shared).
            whole=hs * ws * gemm + gathered * sum(area(c, False) for c in cells if c not in in_all),
            rim=gathered * sum(area(c) for c in cells if c not in in_all),
            cells_cost=gathered * sum(area(c) for c in in_some),
        )

    plans = [plan(key, pairs) for key, pairs in groups_of_pairs.items()]

    # Fast totals: per pair of phases, all its lags at once (fast_correlation). Sigma is
    # symmetric, so a lag group and its mirror image (phases swapped, lag negated) share one
    # correlation: R_(fb,fa)(-d) = R_(fa,fb)(d)^T.
    def canonical(key):
        if y is not None:
            return key, False
        mirror = (key[2], key[3], key[0], key[1], -key[4], -key[5])
        return (mirror, True) if mirror < key else (key, False)

    boxes: dict[tuple, list] = {}
    members: dict[tuple, list] = {}
    for pl in plans:
        ckey, _ = canonical(pl["key"])
        box = boxes.setdefault(ckey[:4], [ckey[4], ckey[5], ckey[4], ckey[5]])
        box[:] = [min(box[0], ckey[4]), min(box[1], ckey[5]), max(box[2], ckey[4]), max(box[3], ckey[5])]
        members.setdefault(ckey[:4], []).append(pl)
    # Per pair of phases (one for a stride-1 conv), the fast totals are worth it when their
    # cost plus the border corrections beats one GEMM (or the cells) per lag group.
    fast_totals = {}
    for phases, (li0, lj0, li1, lj1) in boxes.items():
        ha = len(range(*real_range(phases[0], 0))) if zero_pad else -(-(hp - phases[0]) // sh)
        wa = len(range(*real_range(phases[1], 1))) if zero_pad else -(-(wp - phases[1]) // sw)
        spec = _fast_plan(ha, wa, li1 - li0 + 1, lj1 - lj0 + 1, n, cg, g)
        if spec is None:
            if strategy == "fast":
                raise ValueError(f"no fast lag correlation for {geo} (lag range above {MAX_TOOM_POINTS} points)")
            continue
        group = members[phases]
        fast_cost = spec[1] + sum(min(pl["rim"], pl["cells_cost"]) for pl in group)
        direct_cost = sum(min(pl["whole"], pl["cells_cost"]) for pl in group)
        if strategy == "fast" or (strategy == "auto" and fast_cost < direct_cost
                                  and any(pl["rim"] < pl["cells_cost"] for pl in group)):
            a_img, ar, ac = phase_image(phases[0], phases[1], False)
            if y is None and phases[:2] == phases[2:]:
                b_img, br, bc = a_img, ar, ac  # an autocorrelation: one copy of the image
            else:
                b_img, br, bc = phase_image(phases[2], phases[3], True)
            fast_totals[phases] = (
                fast_correlation(a_img, b_img, (li0 + ar - br, lj0 + ac - bc), (li1 + ar - br, lj1 + ac - bc),
                                 groups=g, tiles=spec[0]),
                li0, lj0,
            )

    def uses_fast(pl) -> bool:
        return canonical(pl["key"])[0][:4] in fast_totals and (strategy == "fast" or pl["rim"] < pl["cells_cost"])

    def uses_whole(pl) -> bool:
        return (canonical(pl["key"])[0][:4] not in fast_totals
                and {"whole": True, "cells": False}.get(strategy, pl["whole"] < pl["cells_cost"]))

    # Whole-grid lag products, a few images at a time: every lag reads the same phase buffers,
    # so a chunk that stays in cache serves all of them (one pass over memory instead of one
    # per lag), while each chunk keeps at least 4 Cg positions so the accumulated Cg x Cg
    # products cost less traffic than the inputs.
    whole_plans = [pl for pl in plans if uses_whole(pl)]
    whole_totals: dict[int, torch.Tensor] = {}
    if whole_plans:
        n_bufs = len({(pl["key"][0], pl["key"][1]) for pl in whole_plans}
                     | {(pl["key"][2], pl["key"][3], y is not None) for pl in whole_plans})
        per_image = hs * ws
        step = max(1, WHOLE_CHUNK_VALUES // (per_image * x.shape[1] * n_bufs), -(-4 * cg // per_image))
        for i0 in range(0, n, step):
            lo, hi = front + i0 * per_image, front + min(n, i0 + step) * per_image
            for idx, pl in enumerate(whole_plans):
                buf_a = phase_buffer(pl["key"][0], pl["key"][1])
                buf_b = phase_buffer(pl["key"][2], pl["key"][3], second=True)
                a_part, b_part = buf_a[lo:hi], buf_b[lo + pl["shift"] : hi + pl["shift"]]
                if idx in whole_totals:
                    _lag_products(a_part, b_part, out=whole_totals[idx])
                else:
                    whole_totals[idx] = _lag_products(a_part, b_part)
    whole_index = {id(pl): idx for idx, pl in enumerate(whole_plans)}

    blocks: dict[tuple[int, int], torch.Tensor] = {}
    for pl in plans:
        fai, faj, fbi, fbj, lag_i, lag_j = pl["key"]
        buf_a, buf_b = phase_buffer(fai, faj), phase_buffer(fbi, fbj, second=True)
        flat_a = buf_a[front : front + m]
        flat_b = buf_b[front + pl["shift"] : front + pl["shift"] + m]
        grid_a = flat_a.view(n, hs, ws, g, cg)
        grid_b = flat_b.view(n, hs, ws, g, cg)
        cells, inside, live, starts, in_all = pl["cells"], pl["inside"], pl["live"], pl["starts"], pl["in_all"]

        def cell_product(cell, both=True):
            r0, r1, c0, c1 = live(cell, both)
            pa = grid_a[:, r0:r1, c0:c1].reshape(-1, g, cg)
            pb = grid_b[:, r0:r1, c0:c1].reshape(-1, g, cg)
            return _lag_products(pa, pb)

        ckey, mirrored = canonical(pl["key"])
        total = None
        if uses_fast(pl):
            corr, li0, lj0 = fast_totals[ckey[:4]]
            total = corr[ckey[4] - li0, ckey[5] - lj0]
            total = total.transpose(1, 2) if mirrored else total
            both = True
        elif id(pl) in whole_index:
            total = whole_totals[whole_index[id(pl)]]
            both = False
        window = {}
        if total is not None:
            outside = {c: cell_product(c, both) for c in cells if c not in in_all and live(c, both)}
            for st in starts:
                acc = total
                for cell, val in outside.items():
                    if not inside(cell, st):
                        acc = acc - val
                window[st] = acc
        else:
            parts = {c: cell_product(c) for c in pl["in_some"]}
            for st in starts:
                terms = [val for cell, val in parts.items() if inside(cell, st)]
                if terms:
                    window[st] = torch.stack(terms).sum(0) if len(terms) > 1 else terms[0]
        for ia, ib in pl["pairs"]:
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
    # (D, samples) with the samples contiguous, the layout oneDNN's GEMM is fast on (_gram)
    xt = flat.T.contiguous()
    yt = xt if y is None else y.reshape(-1, y.shape[-1]).to(compute_dtype).T.contiguous()
    return _gram(xt, yt).unsqueeze(0), flat.sum(0).unsqueeze(0), flat.shape[0]
