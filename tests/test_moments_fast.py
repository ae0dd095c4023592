"""Fast (Toom-Cook) lag correlations: exact in float64, accurate in float32, chosen when cheaper.

Reference everywhere: ``X^T X`` of explicitly unfolded patches (:func:`unfold_patches`).
"""

import itertools

import pytest
import torch

from ddtd.config import CalibrationConfig
import torch.nn.functional as F
from torch import nn

import ddtd.calibration.moments as moments
from ddtd.calibration import calibrate, conv_geometry, conv_input_moments, unfold_patches
from ddtd.calibration.moments import MAX_TOOM_POINTS, fast_correlation, toom_cook_matrices

torch.set_num_threads(1)


def _direct_correlation(a, b, lo, hi):
    """``R[d] = sum_q a[q] b[q + d]^T`` by shifting a zero-padded ``b``: ``(ri, rj, C, C)``."""
    n, c, h, w = a.shape
    p = max(abs(v) for v in (*lo, *hi)) + max(h, w)
    bp = F.pad(b, (p, p + w - b.shape[3], p, p + h - b.shape[2]))
    out = a.new_zeros(hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, c, c)
    for di in range(lo[0], hi[0] + 1):
        for dj in range(lo[1], hi[1] + 1):
            shifted = bp[:, :, p + di : p + di + h, p + dj : p + dj + w]
            out[di - lo[0], dj - lo[1]] = torch.einsum("nchw,ndhw->cd", a, shifted)
    return out


@pytest.mark.parametrize("m,r", [(m, r) for m in range(1, 8) for r in range(1, 8) if m + r - 1 <= MAX_TOOM_POINTS])
def test_toom_cook_transform_is_exact(m, r):
    """y_d = sum_i u_i v_(i+d) == A^T [(G u) * (B v)] for random u, v (float64)."""
    g, b, a = toom_cook_matrices(m, r)
    assert g.shape == (m + r - 1, m) and b.shape == (m + r - 1, m + r - 1) and a.shape == (m + r - 1, r)
    u, v = torch.randn(m, dtype=torch.float64), torch.randn(m + r - 1, dtype=torch.float64)
    ref = torch.stack([(u * v[d : d + m]).sum() for d in range(r)])
    torch.testing.assert_close(a.T @ ((g @ u) * (b @ v)), ref, rtol=1e-12, atol=1e-12)


def test_toom_cook_rejects_too_many_points():
    with pytest.raises(ValueError):
        toom_cook_matrices(4, MAX_TOOM_POINTS)


CORRELATION_CASES = [
    # (a shape (N, C, H, W), b (H, W), lag_lo, lag_hi, groups, tiles)
    ((2, 6, 7, 9), (7, 9), (0, -2), (2, 2), 1, None),
    ((2, 6, 7, 9), (7, 9), (0, -2), (2, 2), 1, (4, 4)),
    ((2, 6, 7, 9), (7, 9), (0, -2), (2, 2), 2, (2, 3)),
    ((3, 4, 5, 8), (6, 7), (-1, 0), (1, 1), 1, None),  # different sizes, a lag box off centre
    ((1, 4, 5, 5), (5, 5), (1, -1), (1, 2), 4, (1, 3)),  # single row lag, depthwise groups
    ((2, 3, 11, 4), (10, 4), (-3, -3), (3, 3), 1, None),  # 7 x 7 lags
    ((2, 4, 1, 1), (1, 1), (0, 0), (0, 0), 1, None),
    ((2, 4, 3, 2), (2, 3), (2, 2), (3, 3), 1, (2, 2)),  # lags that barely overlap
]


@pytest.mark.parametrize("a_shape,b_hw,lo,hi,groups,tiles", CORRELATION_CASES)
def test_fast_correlation_equals_direct(a_shape, b_hw, lo, hi, groups, tiles):
    a = torch.randn(*a_shape, dtype=torch.float64)
    b = torch.randn(a_shape[0], a_shape[1], *b_hw, dtype=torch.float64)
    got = fast_correlation(a, b, lo, hi, groups=groups, tiles=tiles)
    ref = _direct_correlation(a, b, lo, hi)
    cg = a_shape[1] // groups
    assert got.shape == (hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, groups, cg, cg)
    for grp in range(groups):
        sl = slice(grp * cg, (grp + 1) * cg)
        torch.testing.assert_close(got[:, :, grp], ref[:, :, sl, sl], rtol=1e-12, atol=1e-12)


# (kernel, stride, padding, dilation, groups, padding_mode): the fast method handles any of them
# whose lag range fits MAX_TOOM_POINTS points; the others must raise (and "lag" falls back).
FAST_GRID = [(*c, "zeros") for c in itertools.product([1, 2, 3, (3, 1), (1, 3), (2, 3)], [1, 2, (1, 2)],
                                                      [0, 1, (1, 0)], [1, 2], [1, 2, 8])]
FAST_GRID += [(3, 1, 1, 1, 1, "reflect"), (3, 2, 1, 1, 2, "circular"), (3, 1, 2, 1, 1, "replicate"),
              ((5, 3), (2, 1), (2, 1), 1, 1, "reflect"), (4, 1, "same", 1, 1, "zeros"),
              (3, 1, "same", 2, 1, "zeros"), (5, 1, 2, 1, 1, "zeros"), (7, 2, 3, 1, 1, "zeros")]


def _small_lag_range(geo):
    """Kernels up to 3 taps per axis without dilation always fit the Toom-Cook points."""
    return max(geo.kernel_size) <= 3 and geo.dilation == (1, 1)


def _fast_or_none(x, geo, y=None):
    """lag-fast moments, or None when (and only when) a lag range is too long for it."""
    try:
        return conv_input_moments(x, geo, method="lag-fast", y=y)
    except ValueError as e:
        assert "points" in str(e) and not _small_lag_range(geo)
        return None


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("k,s,p,d,g,mode", FAST_GRID)
def test_fast_method_equals_unfold_float64(k, s, p, d, g, mode, chunked, monkeypatch):
    """lag-fast, the automatic choice and the direct lag methods all equal X^T X (1e-12), also
    when the whole-grid products run one image per chunk and the fast correlations one tile
    row of one image per chunk."""
    if chunked:
        monkeypatch.setattr(moments, "WHOLE_CHUNK_VALUES", 1)
        monkeypatch.setattr(moments, "_CHUNK_VALUES", 1)
        monkeypatch.setattr(moments, "_PRODS_FACTOR", 0)
    conv = nn.Conv2d(8, 8, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    geo = conv_geometry(conv)
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    try:
        patches = unfold_patches(x, geo)
    except RuntimeError:
        pytest.skip("kernel larger than input")
    ref = patches.transpose(1, 2) @ patches
    results = [conv_input_moments(x, geo, method=m) for m in ("auto", "lag", "lag-direct", "lag-whole")]
    fast = _fast_or_none(x, geo)
    for xxT, x_sum, count in results + ([fast] if fast is not None else []):
        assert count == patches.shape[1]
        torch.testing.assert_close(xxT, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_sum, patches.sum(1), rtol=1e-12, atol=1e-12)


# (chunk budget, windows read per call as (images, tile rows)): a 27 x 13 map has 5 tile rows of
# 6 (fast_tiles), so budgets give bands of 1, 2 (+ a band of 1) and 3 (+ a band of 2) rows,
# one image, and all three images at once.
ROW_BAND_CASES = [(1, [(1, 1)] * 15), (25000, [(1, 2), (1, 2), (1, 1)] * 3), (40000, [(1, 3), (1, 2)] * 3),
                  (60000, [(1, 5)] * 3), (1 << 21, [(3, 5)])]


@pytest.mark.parametrize("chunk_values,chunks", ROW_BAND_CASES)
def test_fast_correlation_row_bands_equal_unfold_float64(chunk_values, chunks, monkeypatch):
    """Chunks of a few tile rows of one image (the last band shorter), of one image, and of
    several images all give X^T X (1e-12): a large image never needs all its transformed tiles
    in memory at once. The windows read per chunk show which chunking ran."""
    monkeypatch.setattr(moments, "_CHUNK_VALUES", chunk_values)
    monkeypatch.setattr(moments, "_PRODS_FACTOR", 0)
    windows = []
    real = moments._channels_last_window
    monkeypatch.setattr(moments, "_channels_last_window",
                        lambda t, row0, rows, *a, **k: windows.append((t.shape[0], rows)) or real(t, row0, rows, *a, **k))
    geo = conv_geometry(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(3, 8, 27, 13, dtype=torch.float64)
    patches = unfold_patches(x, geo)
    xxT, x_sum, count = conv_input_moments(x, geo, method="lag-fast")
    # An autocorrelation reads one window per chunk: its tile rows times 6, plus the 2 lag rows.
    assert windows == [(n, 6 * t + 2) for n, t in chunks]
    assert count == patches.shape[1]
    torch.testing.assert_close(xxT, patches.transpose(1, 2) @ patches, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_sum, patches.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,d,g,mode", FAST_GRID[::9])
def test_fast_cross_moments_equal_unfold_float64(k, s, p, d, g, mode):
    conv = nn.Conv2d(8, 8, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    geo = conv_geometry(conv)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    y = x + 0.3 * torch.randn_like(x)
    px, py = unfold_patches(x, geo), unfold_patches(y, geo)
    ref = px.transpose(1, 2) @ py
    fast = _fast_or_none(x, geo, y)
    for xyT, x_sum, _ in [conv_input_moments(x, geo, method="lag", y=y)] + ([fast] if fast is not None else []):
        torch.testing.assert_close(xyT, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_sum, px.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,size,stride,tiles", [(32, 28, 1, None), (16, 15, 1, (4, 4)), (16, 15, 1, (2, 2)),
                                                  (32, 9, 2, None)])
def test_fast_float32_close_to_float64(c, size, stride, tiles, monkeypatch):
    """Float32 fast moments of post-ReLU-like data: relative error (to the largest entry of
    Sigma) below 2e-6, and at most 3x the direct float32 method's error plus 2e-7."""
    if tiles is not None:  # force the tile size (the automatic choice is tested below)
        orig = moments.fast_correlation
        monkeypatch.setattr(moments, "fast_correlation", lambda *a, **kw: orig(*a, **{**kw, "tiles": tiles}))
    conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)
    geo = conv_geometry(conv)
    x = torch.relu(torch.randn(6, c, size, size, dtype=torch.float64) + 0.3)
    ref, _, _ = conv_input_moments(x, geo, method="unfold")
    scale = ref.abs().max()
    fast, _, _ = conv_input_moments(x.float(), geo, method="lag-fast")
    direct, _, _ = conv_input_moments(x.float(), geo, method="lag-direct")
    err_fast = ((fast.double() - ref).abs().max() / scale).item()
    err_direct = ((direct.double() - ref).abs().max() / scale).item()
    assert err_fast < 2e-6
    assert err_fast < 3 * err_direct + 2e-7


def _count_fast_calls(monkeypatch):
    calls = []
    orig = moments.fast_correlation
    monkeypatch.setattr(moments, "fast_correlation", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    return calls


@pytest.mark.parametrize("c,size,stride,expect_fast", [(64, 28, 1, True), (128, 14, 1, True),
                                                        (64, 1, 1, False), (8, 28, 1, False)])
def test_auto_uses_fast_where_cheaper(c, size, stride, expect_fast, monkeypatch):
    """Wide stride-1 convs on real-sized maps take the fast path; 1x1 maps and narrow layers
    (where the transforms cost more than they save) keep one GEMM per lag."""
    calls = _count_fast_calls(monkeypatch)
    geo = conv_geometry(nn.Conv2d(c, c, 3, stride=stride, padding=1))
    conv_input_moments(torch.randn(8, c, size, size), geo, method="auto")
    assert bool(calls) == expect_fast
    calls.clear()
    conv_input_moments(torch.randn(8, c, size, size), geo, method="auto-direct")
    assert not calls


def test_identity_through_fast_path(tmp_path, monkeypatch):
    """trace(dW Sigma dW^T) == mean ||layer_W(x) - layer_(W - dW)(x)||^2 (rtol 1e-5) with
    Sigma from calibrate() on a layer whose moments take the fast path."""
    calls = _count_fast_calls(monkeypatch)
    conv = nn.Conv2d(64, 16, 3, padding=1)
    x = torch.relu(torch.randn(5, 64, 20, 20) + 0.3)
    model = nn.Sequential(conv)
    lm = calibrate(model, x, CalibrationConfig(batch_size=3, show_progress=False)).moments["0"]
    assert calls
    w = conv.weight.detach()
    dw = torch.randn_like(w) * w.abs().mean()
    with torch.no_grad():
        diff = (F.conv2d(x, w, padding=1) - F.conv2d(x, w - dw, padding=1)).double()
    samples = diff.permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    measured = samples.pow(2).sum(1).mean()
    dwm = dw.double().reshape(w.shape[0], -1)
    predicted = torch.trace(dwm @ lm.second_moment()[0] @ dwm.T)
    assert lm.count == samples.shape[0]
    torch.testing.assert_close(predicted, measured, rtol=1e-5, atol=0)


def test_fast_correlation_of_empty_image_is_zero():
    out = fast_correlation(torch.zeros(2, 4, 0, 3), torch.randn(2, 4, 3, 3), (0, -1), (1, 1), groups=2)
    assert out.shape == (2, 3, 2, 2, 2) and not out.any()

