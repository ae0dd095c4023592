"""The calibration stage end to end: Sigma from the store predicts the real output error.

For a layer with weight W and a random perturbation dW, the identity
    trace(dW Sigma dW^T) == mean over samples of ||layer_W(x) - layer_{W - dW}(x)||^2
must hold with Sigma read back from the HDF5 store, outputs computed by the real layers.
"""

import itertools

import pytest
import torch

from ddtd.config import CalibrationConfig
from torch import nn

from ddtd.calibration import (
    CovarianceStore,
    calibrate,
    conv_geometry,
    conv_input_moments,
    save_calibration,
    unfold_patches,
)

RTOL = 1e-5

CONV_GRID = [
    # (kernel, stride, padding, dilation, groups, padding_mode)
    (3, 1, 1, 1, 1, "zeros"),
    (3, 2, 1, 1, 1, "zeros"),
    (3, 1, 0, 1, 1, "zeros"),
    (3, 1, 2, 2, 1, "zeros"),
    (3, 2, 1, 1, 2, "zeros"),
    (3, 1, 1, 1, 4, "zeros"),  # depthwise-like (4 groups of 1 input channel... see below)
    (5, 3, 2, 1, 1, "zeros"),
    (1, 1, 0, 1, 1, "zeros"),
    (1, 2, 0, 1, 2, "zeros"),
    (3, 1, "same", 2, 1, "zeros"),
    (4, 1, "same", 1, 1, "zeros"),  # asymmetric 'same' padding
    (3, 1, 1, 1, 1, "reflect"),
    (3, 2, 1, 1, 2, "circular"),
    (3, 1, 1, 1, 1, "replicate"),
    ((3, 1), (2, 1), (1, 0), 1, 1, "zeros"),  # k x 1 kernels
    ((1, 5), 1, (0, 2), (1, 2), 1, "zeros"),
    (7, 2, 3, 1, 1, "zeros"),  # an RGB stem: space-to-depth path
    ((5, 3), (3, 2), (2, 1), (1, 2), 1, "reflect"),
]


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _stored_moments(layer, x, tmp_path):
    model = Wrap(layer)
    result = calibrate(model, x, CalibrationConfig(batch_size=3, show_progress=False))
    path = save_calibration(result, tmp_path / "s.h5")
    store = CovarianceStore(path)
    store.check_model(model)
    return store["layer"]


def _check_identity(layer, x, lm):
    """Both the uncentred and the centred (bias-corrected) identities, per group."""
    g = lm.groups
    w = layer.weight.detach()
    dw = torch.randn_like(w) * w.abs().mean()
    perturbed = type(layer).__new__(type(layer))
    perturbed.__dict__ = {**layer.__dict__, "_parameters": dict(layer._parameters)}
    perturbed.weight = nn.Parameter(w - dw)
    with torch.no_grad():
        y, y2 = layer(x), perturbed(x)
    diff = (y - y2).double()
    if isinstance(layer, nn.Conv2d):
        t = w.shape[0]
        samples = diff.permute(0, 2, 3, 1).reshape(-1, t)  # one row per output position
    else:
        samples = diff.reshape(-1, w.shape[0])
    measured = samples.pow(2).sum(1).mean()
    measured_c = (samples - samples.mean(0)).pow(2).sum(1).mean()
    dwg = dw.double().reshape(g, w.shape[0] // g, -1)
    sigma, sigma_c = lm.second_moment(), lm.covariance()
    predicted = sum(torch.trace(dwg[i] @ sigma[i] @ dwg[i].T) for i in range(g))
    predicted_c = sum(torch.trace(dwg[i] @ sigma_c[i] @ dwg[i].T) for i in range(g))
    assert lm.count == samples.shape[0]
    torch.testing.assert_close(predicted, measured, rtol=RTOL, atol=0)
    torch.testing.assert_close(predicted_c, measured_c, rtol=RTOL, atol=0)


@pytest.mark.parametrize("k,s,p,d,g,mode", CONV_GRID)
def test_conv_identity(k, s, p, d, g, mode, tmp_path):
    c_in = 4 if g != 4 else 4
    conv = nn.Conv2d(c_in, 8, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    x = torch.relu(torch.randn(7, c_in, 13, 11) + 0.3)  # non-zero mean, like post-ReLU data
    lm = _stored_moments(conv, x, tmp_path)
    assert lm.groups == g
    _check_identity(conv, x, lm)


@pytest.mark.parametrize("shape", [(50, 12), (6, 9, 12), (2, 3, 5, 12)])
def test_linear_identity(shape, tmp_path):
    lin = nn.Linear(12, 7)
    x = torch.randn(*shape) + 0.5
    lm = _stored_moments(lin, x, tmp_path)
    _check_identity(lin, x, lm)


def test_conv_identity_channels_last_and_many_channels(tmp_path):
    """A wider conv (the lag method's GEMM path) on a channels-last input."""
    conv = nn.Conv2d(32, 16, 3, padding=1)
    x = torch.relu(torch.randn(4, 32, 9, 9)).to(memory_format=torch.channels_last)
    lm = _stored_moments(conv, x, tmp_path)
    _check_identity(conv, x, lm)


GEOMETRY_GRID = [(*c, "zeros") for c in itertools.product([1, 2, 3], [1, 2, 3], [0, 1, 2], [1, 2], [1, 2, 8])]
GEOMETRY_GRID += [(3, 1, 1, 1, 1, "reflect"), (3, 2, 2, 1, 2, "circular"), (5, 2, 1, 2, 1, "replicate")]


@pytest.mark.parametrize("k,s,p,d,g,mode", GEOMETRY_GRID)
def test_lag_and_unfold_methods_equal_reference(k, s, p, d, g, mode):
    """Every moment algorithm equals X^T X of explicitly unfolded patches (float64, 1e-12)."""
    conv = nn.Conv2d(8, 8, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    geo = conv_geometry(conv)
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    if (10 + 2 * p - d * (k - 1) - 1) < 0:
        pytest.skip("kernel larger than input")
    patches = unfold_patches(x, geo)
    ref = patches.transpose(1, 2) @ patches
    methods = ["lag", "lag-whole", "lag-cells", "unfold", "dense"] + (["lag-s2d"] if g == 1 and s > 1 else [])
    methods += ["gather"] if g == 1 else []
    for method in methods:
        xxT, x_sum, count = conv_input_moments(x, geo, method=method)
        assert count == patches.shape[1]
        torch.testing.assert_close(xxT, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_sum, patches.sum(1), rtol=1e-12, atol=1e-12)


def test_unfold_patches_reproduce_conv_output():
    """The unfold order is the weight's reshape order: W @ patches == conv output."""
    conv = nn.Conv2d(6, 4, 3, stride=2, padding=1, dilation=2, groups=2).double()
    x = torch.randn(2, 6, 11, 12, dtype=torch.float64)
    geo = conv_geometry(conv)
    patches = unfold_patches(x, geo)  # (g, P, D)
    w = conv.weight.reshape(2, 2, -1)
    y = torch.einsum("gtd,gpd->gpt", w, patches)
    ref = (conv(x) - conv.bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, 2, 2).transpose(0, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p,d,g,mode", GEOMETRY_GRID[::7])
def test_cross_moments_equal_reference(k, s, p, d, g, mode):
    """sum x y^T over patches of two inputs at the same positions (for sequential fitting)."""
    conv = nn.Conv2d(8, 8, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    geo = conv_geometry(conv)
    x = torch.randn(2, 8, 10, 9, dtype=torch.float64)
    y = x + 0.3 * torch.randn_like(x)
    px, py = unfold_patches(x, geo), unfold_patches(y, geo)
    ref = px.transpose(1, 2) @ py
    methods = ["lag", "lag-whole", "lag-cells", "unfold", "dense"] + (["lag-s2d"] if g == 1 and s > 1 else [])
    for method in methods + (["gather"] if g == 1 else []):
        xyT, x_sum, count = conv_input_moments(x, geo, method=method, y=y)
        torch.testing.assert_close(xyT, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_sum, px.sum(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [32, 64])
def test_strided_and_pointwise_convs_use_gathered_patches(size, monkeypatch):
    """``auto`` takes gathered patches for a strided RGB stem, a strided 3x3 conv and a 1x1
    conv, and space-to-depth for the stem under ``auto-direct``; chunked gathering (one image
    per chunk) equals X^T X (1e-12), cross moments too."""
    import ddtd.calibration.moments as moments

    calls = []
    orig = moments._gathered_moments
    monkeypatch.setattr(moments, "_gathered_moments",
                        lambda *a, **kw: calls.append(1) or orig(*a, **{**kw, "chunk_values": 1}))
    for conv in (nn.Conv2d(3, 16, 7, stride=2, padding=3), nn.Conv2d(16, 8, 3, stride=2, padding=1),
                 nn.Conv2d(8, 16, 1)):  # D = 147, 144 (three-quarter Gram), 8
        geo = conv_geometry(conv)
        x = torch.randn(3, conv.in_channels, size, size, dtype=torch.float64)
        y = x + 0.1 * torch.randn_like(x)
        patches, patches_y = unfold_patches(x, geo), unfold_patches(y, geo)
        calls.clear()
        xxT, x_sum, count = conv_input_moments(x, geo, method="auto")
        assert calls
        assert count == patches.shape[1]
        torch.testing.assert_close(xxT, patches.transpose(1, 2) @ patches, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_sum, patches.sum(1), rtol=1e-12, atol=1e-12)
        xyT, _, _ = conv_input_moments(x, geo, method="auto", y=y)
        torch.testing.assert_close(xyT, patches.transpose(1, 2) @ patches_y, rtol=1e-12, atol=1e-12)
    calls.clear()
    stem = conv_geometry(nn.Conv2d(3, 16, 7, stride=2, padding=3))
    conv_input_moments(torch.randn(2, 3, size, size, dtype=torch.float64), stem, method="auto-direct")
    assert not calls


TINY_MAP_GRID = [
    (hw, geo) for hw in [(1, 1), (2, 2), (4, 3), (4, 4)]
    for geo in [(3, 1, 1, 1, 1, "zeros"), (3, 2, 1, 1, 1, "zeros"), (3, 1, 2, 2, 2, "zeros"),
                (2, 1, 0, 1, 1, "zeros"), (3, 1, 1, 1, 4, "reflect"), (3, 2, 1, 1, 1, "circular")]
    # the kernel fits the padded input; reflect / circular padding narrower than the input
    if min(hw) + 2 * geo[2] - geo[3] * (geo[0] - 1) - 1 >= 0 and (geo[5] == "zeros" or geo[2] < min(hw))
]


@pytest.mark.parametrize("hw,geometry", TINY_MAP_GRID)
def test_tiny_maps_use_dense_moments(hw, geometry, monkeypatch):
    """On maps of at most 16 positions ``auto`` builds Sigma from the whole input's second
    moment (8 channels per group); it equals X^T X of the unfolded patches (float64, 1e-12),
    cross moments too. A depthwise conv on the same map keeps the lag products."""
    import ddtd.calibration.moments as moments

    k, s, p, d, g, mode = geometry
    conv = nn.Conv2d(8 * g, 8 * g, k, stride=s, padding=p, dilation=d, groups=g, padding_mode=mode)
    geo = conv_geometry(conv)
    calls = []
    orig = moments._dense_moments
    monkeypatch.setattr(moments, "_dense_moments", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    depthwise = conv_geometry(nn.Conv2d(8, 8, k, stride=s, padding=p, dilation=d, groups=8, padding_mode=mode))
    conv_input_moments(torch.randn(2, 8, *hw, dtype=torch.float64), depthwise, method="auto")
    assert not calls
    x = torch.randn(5, 8 * g, *hw, dtype=torch.float64)
    y = x + 0.1 * torch.randn_like(x)
    px, py = unfold_patches(x, geo), unfold_patches(y, geo)
    xxT, x_sum, count = conv_input_moments(x, geo, method="auto")
    # other padding modes pad first: dense when the padded map has at most 16 positions
    assert bool(calls) == (mode == "zeros" or (hw[0] + 2 * p) * (hw[1] + 2 * p) <= 16)
    assert count == px.shape[1]
    torch.testing.assert_close(xxT, px.transpose(1, 2) @ px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_sum, px.sum(1), rtol=1e-12, atol=1e-12)
    xyT, _, _ = conv_input_moments(x, geo, method="dense", y=y)
    torch.testing.assert_close(xyT, px.transpose(1, 2) @ py, rtol=1e-12, atol=1e-12)


class _InPlaceAfterConv(nn.Module):
    """A conv whose input is modified in place after the conv has read it (like ReLU(inplace))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x)
        x.mul_(-3.0)  # the buffered copy must not see this
        return self.fc(y.mean(1).flatten(1)[:, :8]) + x.sum()


def test_coalesced_batches_give_the_same_sums():
    """Buffering a layer's inputs across batches (the default) changes no sum and no count,
    and survives the model modifying its inputs in place after the conv read them."""
    from ddtd.calibration import MomentCollector

    torch.manual_seed(0)
    model = _InPlaceAfterConv().double()
    batches = [torch.randn(n, 4, 5, 5, dtype=torch.float64) for n in (3, 1, 4, 2)]
    results = []
    for coalesce in (0, 1 << 20):
        with torch.no_grad(), MomentCollector(model, coalesce_bytes=coalesce) as col:
            for b in batches:
                model(b.clone())
        results.append(col.moments)
    direct, coalesced = results
    ref_x = torch.cat(batches)
    ref_xxT, ref_sum, ref_count = conv_input_moments(ref_x, conv_geometry(model.conv), method="unfold")
    for name in ("conv", "fc"):
        assert coalesced[name].count == direct[name].count
        torch.testing.assert_close(coalesced[name].xxT, direct[name].xxT, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(coalesced[name].x_sum, direct[name].x_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coalesced["conv"].xxT, ref_xxT, rtol=1e-12, atol=1e-10)
    assert coalesced["conv"].count == ref_count


def test_coalescing_buffer_is_bounded_and_flushed_when_full():
    from ddtd.calibration import MomentCollector

    model = Wrap(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(40, 2, 4, 4)
    row_bytes = 2 * 4 * 4 * 4  # one image's input, float32: the budget holds 10 images
    with torch.no_grad(), MomentCollector(model, coalesce_bytes=10 * row_bytes) as col:
        for b in x.split(3):
            model(b)
            pending = col._pending.get("layer")
            assert pending is None or pending[0].numel() * 4 <= 10 * row_bytes
    assert col.moments["layer"].count == 40 * 16


def test_interrupted_pass_discards_buffered_inputs():
    from ddtd.calibration import MomentCollector

    model = Wrap(nn.Linear(3, 2))
    col = MomentCollector(model)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), col:
        model(torch.randn(4, 3))
        raise KeyboardInterrupt
    assert col.moments == {}


class _ThreeConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.flatten(1))


def test_layers_computed_side_by_side_give_the_same_sums():
    """With two threads, buffers flushed together (mid-pass when one is full, and at the end)
    are computed one layer per thread; the sums equal the one-thread, per-batch ones (1e-12)."""
    from ddtd.calibration import MomentCollector

    torch.manual_seed(0)
    model = _ThreeConvs().double()
    batches = [torch.randn(n, 3, 8, 8, dtype=torch.float64) for n in (3, 2, 4, 3, 1)]
    import threading

    workers = []
    orig = MomentCollector._layer_moments

    def recording(self, name, x):
        workers.append(threading.current_thread() is not threading.main_thread())
        return orig(self, name, x)

    runs = {}
    before = torch.get_num_threads()
    try:
        MomentCollector._layer_moments = recording
        for label, threads, coalesce, parallel in (("reference", 1, 0, False), ("side by side", 2, 6 * 3 * 8 * 8 * 8 * 4, True)):
            torch.set_num_threads(threads)
            with torch.no_grad(), MomentCollector(model, coalesce_bytes=coalesce, parallel_flush=parallel) as col:
                for b in batches:
                    model(b)
            runs[label] = col.moments
            # the thread count is restored, for this thread and for threads started later
            later = []
            t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
            t.start()
            t.join()
            assert torch.get_num_threads() == threads and later == [threads]
    finally:
        MomentCollector._layer_moments = orig
        torch.set_num_threads(before)
    assert any(workers)  # some layers were computed on worker threads
    for name, ref in runs["reference"].items():
        got = runs["side by side"][name]
        assert got.count == ref.count
        torch.testing.assert_close(got.xxT, ref.xxT, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.x_sum, ref.x_sum, rtol=1e-12, atol=1e-12)


def test_nan_found_by_a_worker_thread_names_the_layer():
    from ddtd.calibration import MomentCollector
    from ddtd.errors import NumericalError

    model = _ThreeConvs()
    with torch.no_grad():
        model.b.weight.fill_(1e30)  # finite input to c, but its squares overflow float32
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(NumericalError, match="'c'"), torch.no_grad(), MomentCollector(model):
            model(torch.rand(4, 3, 8, 8))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method,c,k,s,size", [("gather", 3, 7, 2, 32), ("gather", 96, 3, 2, 8), ("gather", 128, 1, 1, 6),
                                               ("dense", 128, 3, 1, 4), ("dense", 256, 3, 2, 2)])
def test_gemm_paths_float32_close_to_float64(method, c, k, s, size):
    """The float32 moments of the gathered / dense paths (oneDNN GEMMs on the CPU when
    available) are within 2e-6 of float64 Sigma (relative to its largest entry), and so is a
    Linear layer's."""
    from ddtd.calibration.moments import linear_input_moments

    torch.manual_seed(0)
    geo = conv_geometry(nn.Conv2d(c, 8, k, stride=s, padding=k // 2))
    x = torch.relu(torch.randn(64, c, size, size, dtype=torch.float64) + 0.3)
    ref, ref_sum, _ = conv_input_moments(x, geo, method="unfold")
    got, got_sum, _ = conv_input_moments(x.float(), geo, method=method)
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6
    assert ((got_sum.double() - ref_sum).abs().max() / ref_sum.abs().max()).item() < 2e-6
    flat = x.permute(0, 2, 3, 1).reshape(-1, c)
    lin, _, _ = linear_input_moments(flat.float())
    lin_ref = flat.T @ flat
    assert ((lin[0].double() - lin_ref).abs().max() / lin_ref.abs().max()).item() < 2e-6
