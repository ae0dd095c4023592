"""End-to-end compression: ratios met, files reload safely, bad inputs refused, Sigma beats Frobenius."""

import math

import pytest
import torch

from ddtd.config import CalibrationConfig, config_from_options
from ddtd.selection import layer_filter
from torch import nn

from conftest import write_images
from ddtd.calibration import calibrate, save_calibration
from ddtd.cli import main
from ddtd import pipeline
from ddtd import sequential
from ddtd.fitting import LayerData, solve
from ddtd.pipeline import compress
from ddtd.errors import DdtdError, InputError, StoreMismatchError
from ddtd.methods import SvdConfig
from ddtd.model_io import load_model, save_model


def small_cnn(num_classes: int = 10, width: int = 32) -> nn.Module:
    """A VGG-like net with BN, big enough for rank granularity to be fine."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _randomise_bn(small_cnn())


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    # Correlated, non-negative images: anisotropic input statistics like real photos.
    base = torch.randn(96, 3, 4, 4)
    x = nn.functional.interpolate(base, size=16, mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn_like(x)


def _out_err(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).norm() / ya.norm())


@pytest.mark.parametrize("strategy", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [2.0, 3.0])
def test_requested_ratio_is_met_within_2_percent(net, data, strategy, ratio):
    res = compress(net, data, config_from_options(ratio=ratio, method="svd", strategy=strategy, sequential=False, show_progress=False))
    assert abs(res.report.ratio / ratio - 1) <= 0.02, res.report.ratio
    assert res.report.params_after == sum(p.numel() for p in res.model.parameters())


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp3", "cp4", "auto"])
def test_every_method_compresses_and_reports(net, data, method):
    res = compress(net, data, config_from_options(ratio=2.0, method=method, strategy="uniform", max_iter=8,
                                                  sequential=False, show_progress=False))
    rows = [r for r in res.report.layers if r.method != "dense"]
    assert rows and all(r.params_after < r.params_before for r in rows)
    assert all(0 <= r.sigma_error < 1 for r in rows)
    assert _out_err(net, res.model, data) < 0.5
    from ddtd.layers.sparse import LowRankSparse, SharedBasis

    plain = (nn.Conv2d, nn.Linear, nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity, nn.AdaptiveAvgPool2d,
             nn.Flatten)
    for m in res.model.modules():  # plain PyTorch (a sparse part is a module of its own)
        assert isinstance(m, plain + (LowRankSparse, SharedBasis)), type(m)
        if method != "auto":
            assert isinstance(m, plain), type(m)


def test_sigma_beats_frobenius_on_output_error(net, data):
    kw = dict(ratio=3.0, method="svd", strategy="uniform", sequential=False, show_progress=False)
    sig = compress(net, data[:64], config_from_options(norm="sigma", **kw))
    fro = compress(net, data[:64], config_from_options(norm="frobenius", **kw))
    held_out = data[64:]
    assert _out_err(net, sig.model, held_out) < 0.5 * _out_err(net, fro.model, held_out)


def test_bias_correction_makes_sigma_error_the_output_error():
    """One layer: the reported centred Sigma error equals the measured mean output error."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).double()
    x = torch.relu(torch.randn(8, 16, 9, 9, dtype=torch.float64) + 0.5)
    lm = calibrate(nn.Sequential(conv), x, CalibrationConfig(show_progress=False)).moments["0"]
    out = solve(conv, SvdConfig(), 6, LayerData(lm.covariance(), lm.mean()), name="0")
    approx = nn.Conv2d(16, 24, 3, padding=1).double()
    from ddtd.layers import factorized_weight

    approx.weight.data = factorized_weight(conv, "svd", *out.factors).double()
    approx.bias.data = out.bias.double()
    with torch.no_grad():
        y, y2 = conv(x), approx(x)
    err = (y - y2).pow(2).sum(1).mean()
    yc = y - y.mean(dim=(0, 2, 3), keepdim=True)
    energy = yc.pow(2).sum(1).mean()
    torch.testing.assert_close(err / energy, torch.tensor(out.sigma_error, dtype=torch.float64), rtol=1e-6, atol=0)


def test_sequential_fit_is_optimal_for_the_compressed_inputs():
    """Layer 2 fitted on the inputs that compressed layer 1 produces has a lower error against
    the original layer-2 outputs than layer 2 fitted on the original inputs (same ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1)).eval()
    x = torch.nn.functional.interpolate(torch.randn(32, 8, 5, 5), size=12, mode="bilinear") + 0.2
    kw = dict(rank=4, method="svd", show_progress=False)
    every = layer_filter(model, include_first=True)
    plain = compress(model, x, config_from_options(sequential=False, **kw), filter_fn=every)
    seq = compress(model, x, config_from_options(sequential=True, **kw), filter_fn=every)
    with torch.no_grad():
        target = model(x)
        first = torch.equal(plain.model[0](x), seq.model[0](x))  # layer 1 is fitted identically
        e_plain = (plain.model(x) - target).pow(2).mean()
        e_seq = (seq.model(x) - target).pow(2).mean()
    assert first
    assert e_seq < e_plain, (float(e_seq), float(e_plain))  # optimal for its objective


def test_regression_target_on_the_support_equals_the_full_pseudo_inverse():
    """A 3x3 conv on a 1x1 map: eight of nine taps only meet zero padding, so ``C_{x~x~}`` has
    zero rows; the target from the support's eigendecomposition equals ``W C_{xx~} C_{x~x~}^+ +
    W (I - P)`` from the full one (float rounding), and keeps ``W`` on the zero coordinates."""
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 12, 3, padding=1)
    x = torch.randn(40, 16, 1, 1)
    xt = x + 0.3 * torch.randn_like(x)
    c_tt, c_xt, _, _ = sequential.cross_moments(layer, [x], [xt])
    W = layer.weight.detach().double()
    ev, V = torch.linalg.eigh(c_tt[0])
    Vk = V[:, ev > 1e-10 * ev.max()]
    full = W.reshape(12, -1) @ (c_xt[0] @ torch.linalg.pinv(c_tt[0], hermitian=True, rtol=1e-10)
                                + torch.eye(144, dtype=torch.float64) - Vk @ Vk.T)
    got = sequential.regression_target(W, c_tt, c_xt)
    torch.testing.assert_close(got.reshape(12, -1), full, rtol=1e-9, atol=1e-9)
    ev_s, v_s, idx = sequential.support_eigh(c_tt[0])
    assert idx.tolist() == list(range(4, 144, 9))  # the centre tap of each channel
    torch.testing.assert_close(ev_s, ev[-16:], rtol=1e-10, atol=1e-12)
    outer = torch.ones(144, dtype=torch.bool)
    outer[idx] = False
    assert torch.equal(got.reshape(12, -1)[:, outer], W.reshape(12, -1)[:, outer])
    assert torch.equal(sequential.regression_target(W, torch.zeros_like(c_tt), c_xt), W)


def test_saved_file_reloads_with_weights_only_and_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = load_model("ddtd.zoo:vgg_fmnist")
    _randomise_bn(model)
    src = tmp_path / "vgg.ddtd"
    save_model(model, src)
    before = src.read_bytes()
    imgs = tmp_path / "imgs"
    write_images(imgs, 24, size=(32, 32))
    out = tmp_path / "c.ddtd"
    assert main(["compress", "--model", str(src), "--images", str(imgs), "--size", "32", "--ratio", "3",
                 "--method", "tucker2", "--max-iter", "5", "-o", str(out), "--export", "torchscript"]) == 0
    assert src.read_bytes() == before  # the original is never touched
    reloaded = load_model(out)  # torch.load(weights_only=True) + replayed replacements
    x = torch.randn(4, 3, 32, 32)
    scripted = torch.jit.load(str(out.with_suffix(".ts")))
    with torch.no_grad():
        y = reloaded(x)
        torch.testing.assert_close(scripted(x), y, rtol=1e-5, atol=1e-5)
    obj = torch.load(out, weights_only=True)
    assert obj["report"]["ratio"] == pytest.approx(3, rel=0.02)
    # the report command reads it back
    assert main(["report", str(out)]) == 0


def test_bad_inputs_are_refused_and_write_nothing(tmp_path, net, data, capsys):
    with pytest.raises(InputError, match="finite number > 1"):
        compress(net, data, config_from_options(ratio=1.0, show_progress=False))
    with pytest.raises(InputError, match="larger than the layer allows"):
        compress(net, data, config_from_options(rank=10_000, method="svd", show_progress=False))
    with pytest.raises(InputError, match="give one size"):
        compress(net, data, config_from_options(ratio=2, rank=3, show_progress=False))
    # a store missing a layer
    model = load_model("ddtd.zoo:vgg_fmnist")
    src = tmp_path / "vgg.ddtd"
    save_model(model, src)
    imgs = tmp_path / "imgs"
    write_images(imgs, 8, size=(32, 32))
    store = tmp_path / "part.h5"
    assert main(["calibrate", "--model", str(src), "--images", str(imgs), "--size", "32",
                 "--layers", "0.0,0.3", "-o", str(store)]) == 0
    out = tmp_path / "c.ddtd"
    assert main(["compress", "--model", str(src), "--calib", str(store), "--size", "32", "--ratio", "2",
                 "-o", str(out)]) == 2
    assert "no entry in the covariance store" in capsys.readouterr().err and not out.exists()
    # a store of another model
    other = tmp_path / "other.h5"
    res = calibrate(small_cnn(), torch.randn(4, 3, 16, 16), CalibrationConfig(show_progress=False))
    save_calibration(res, other)
    assert main(["compress", "--model", str(src), "--calib", str(other), "--size", "32", "--ratio", "2",
                 "-o", str(out)]) == 2
    assert "made for another model" in capsys.readouterr().err and not out.exists()
    # a ratio the selected layers cannot reach
    assert main(["compress", "--model", str(src), "--images", str(imgs), "--size", "32", "--ratio", "50",
                 "--layers", "0.3", "-o", str(out)]) == 2
    assert "out of reach" in capsys.readouterr().err and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_store_mismatch_raises_typed_error(tmp_path, net):
    res = calibrate(small_cnn(width=8), torch.randn(2, 3, 16, 16), CalibrationConfig(show_progress=False))
    save_calibration(res, tmp_path / "s.h5")
    with pytest.raises(StoreMismatchError):
        compress(net, None, config_from_options(ratio=2, input_shape=(3, 16, 16), show_progress=False), store=tmp_path / "s.h5")
    assert issubclass(StoreMismatchError, DdtdError)


def test_eval_accuracy_and_agreement_on_a_labelled_folder(tmp_path, capsys):
    """`ddtd eval`: accuracy against sub-folder labels (sorted order), agreement, output error."""
    import json

    from ddtd.data import ImageFolder, ImageTransform

    torch.manual_seed(0)
    model = load_model("ddtd.zoo:vgg_fmnist")
    _randomise_bn(model)
    src = tmp_path / "m.ddtd"
    save_model(model, src)
    imgs = tmp_path / "imgs"
    write_images(imgs, 20, size=(32, 32), classes=tuple(f"{i:02d}-c" for i in range(10)))
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(src), "--reference", str(src), "--images", str(imgs), "--size", "32",
                 "--no-latency", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    folder = ImageFolder.scan(imgs)
    xs, ys = zip(*folder.batches(ImageTransform(size=32), batch_size=100, labels=True))
    with torch.no_grad():
        expected = float((model(torch.cat(xs)).argmax(1) == torch.cat(ys)).float().mean())
    assert res["images"] == 20 and res["accuracy"] == pytest.approx(expected)
    assert res["agreement"] == 1.0 and res["relative_output_error"] == 0.0


def test_conv_only_methods_fall_back_to_svd_for_linear_layers(net, data):
    res = compress(net, data, config_from_options(ratio=2.0, method="tucker2", strategy="uniform", max_iter=4, show_progress=False), filter_fn=layer_filter(net, include_last=True))
    kinds = {r.name: r.method for r in res.report.layers}
    assert kinds["19"] == "svd" and kinds["21"] == "svd"  # the two Linear layers
    assert any(m == "tucker2" for m in kinds.values())


# --------------------------------------------------------------------------- stable CP and low-rank + sparse

def _tiny_cnn():
    torch.manual_seed(0)
    return _randomise_bn(small_cnn(width=8))


@pytest.mark.parametrize("method", ["cp3-stable", "cp4-stable", "lrs", "sparse"])
def test_new_methods_compress_save_and_reload(tmp_path, data, method):
    """Every registered method compresses, reports its extras, and its file reloads with
    weights_only=True to identical outputs."""
    from ddtd.layers.sparse import LowRankSparse

    net = _tiny_cnn()
    net.ddtd_spec = {"source": "factory", "name": "test_compress:small_cnn", "kwargs": {"width": 8}}
    res = compress(net, data, config_from_options(ratio=2.0, method=method, max_iter=10, show_progress=False))
    rows = [r for r in res.report.layers if r.method not in ("dense", "svd")]
    assert rows and all(r.method == method for r in rows)
    assert abs(res.report.ratio / 2.0 - 1) <= 0.02, res.report.ratio
    if method.endswith("-stable"):
        for r in rows:  # never more sensitive than the CP-ALS start, same error bound
            assert r.info["sensitivity_after"] <= r.info["sensitivity_before"] * (1 + 1e-9)
    else:
        lrs = [m for m in res.model.modules() if isinstance(m, LowRankSparse)]
        assert len(lrs) == len(rows)
        for r in rows:  # indices are counted: values + int32 indices + factors
            assert r.params_after * 4 == r.info["bytes"]
    out = tmp_path / "m.ddtd"
    save_model(res.model, out, replacements=res.records)
    reloaded = load_model(out, trust_factory="test_compress")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(data[:8]), res.model(data[:8]), rtol=1e-5, atol=1e-6)


def test_lowrank_sparse_beats_lowrank_only_and_pruning_only_at_equal_bytes(data):
    """Same byte budget per layer: ddtd's low-rank + sparse fit has a lower held-out output
    error than the svd (low rank only) and magnitude pruning (sparse only, Frobenius)."""
    net = _tiny_cnn()
    kw = dict(ratio=2.0, strategy="uniform", show_progress=False, max_iter=10)
    fit = compress(net, data[:64], config_from_options(method="lrs", **kw))
    low = compress(net, data[:64], config_from_options(method="svd", **kw))
    mag = compress(net, data[:64], config_from_options(method="sparse", norm="frobenius", **kw))
    assert fit.report.params_after <= low.report.params_after * 1.001
    held = data[64:]
    e_fit, e_low, e_mag = (_out_err(net, r.model, held) for r in (fit, low, mag))
    assert e_fit < e_low and e_fit < e_mag, (e_fit, e_low, e_mag)


def _cli_model_and_images(tmp_path):
    """A saved tiny CNN (rebuildable by factory) and 16 images of 16 x 16 for CLI runs."""
    torch.manual_seed(0)
    net = _tiny_cnn()
    net.ddtd_spec = {"source": "factory", "name": "test_compress:small_cnn", "kwargs": {"width": 8}}
    src = tmp_path / "net.ddtd"
    save_model(net, src)
    imgs = tmp_path / "imgs"
    write_images(imgs, 16, size=(16, 16))
    return src, imgs


def test_cli_accepts_the_new_methods(tmp_path):
    src, imgs = _cli_model_and_images(tmp_path)
    out = tmp_path / "c.ddtd"
    assert main(["compress", "--model", str(src), "--trust-factory", "test_compress", "--images", str(imgs), "--size", "16", "--ratio", "2",
                 "--method", "lrs", "--sparsity", "0.5", "-o", str(out)]) == 0
    rep = torch.load(out, weights_only=True)["report"]
    rows = [r for r in rep["layers"] if r["method"] == "lrs"]
    assert rows and all(r["info"]["nnz"] > 0 for r in rows)


def test_cli_stable_finish_reaches_the_solver(tmp_path):
    """--stable-finish refit: the first stable layer (same inputs both runs) fits strictly
    better than with the default per-channel scale (so the option reached the solver); an
    unknown value is refused by the parser."""
    src, imgs = _cli_model_and_images(tmp_path)
    first = {}
    for finish in ("channel", "refit"):
        out = tmp_path / f"{finish}.ddtd"
        assert main(["compress", "--model", str(src), "--trust-factory", "test_compress", "--images", str(imgs), "--size", "16", "--rank", "3",
                     "--method", "cp3-stable", "--stable-finish", finish, "--no-sequential",
                     "-o", str(out)]) == 0
        rows = [r for r in torch.load(out, weights_only=True)["report"]["layers"] if r["method"] == "cp3-stable"]
        assert rows
        first[finish] = rows[0]["sigma_error"]
    assert first["refit"] < first["channel"] * (1 - 1e-6), first
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(src), "--trust-factory", "test_compress", "--images", str(imgs), "--stable-finish", "rescale", "-o",
              str(tmp_path / "x.ddtd")])


def test_sequential_auto_needs_a_significantly_lower_held_out_error(data, monkeypatch):
    """Default with images: per layer, sequential only when an svd probe fitted that way has a
    held-out output error lower by more than SEQUENTIAL_Z standard errors; the first compressed
    layer (nothing upstream changed) is never sequential."""
    net = _tiny_cnn()
    res = compress(net, data, config_from_options(rank=3, method="svd", show_progress=False))
    assert res.report.settings["sequential"] == "auto"
    rows = [r for r in res.report.layers if r.method != "dense"]
    assert "heldout_error" not in rows[0].info and rows[0].note == ""
    decided = [r for r in rows if "heldout_error" in r.info]
    assert decided
    for r in decided:
        e = r.info["heldout_error"]
        # z is the mean per-image difference over its standard error: its sign is the totals'
        assert (e["z"] > 0) == (e["sequential"] < e["original_inputs"])
        assert (r.note == "sequential") == (e["z"] > sequential.SEQUENTIAL_Z)
    # the threshold decides: none sequential above every z, all decided ones below
    for z, expect in ((math.inf, set()), (-math.inf, {r.name for r in decided})):
        monkeypatch.setattr(sequential, "SEQUENTIAL_Z", z)
        again = compress(net, data, config_from_options(rank=3, method="svd", show_progress=False))
        assert {r.name for r in again.report.layers if r.note == "sequential"} == expect
    # the Frobenius baseline stays data-free unless asked
    fro = compress(net, data, config_from_options(rank=3, method="svd", norm="frobenius", show_progress=False))
    assert fro.report.settings["sequential"] == "off"


def test_paired_z_is_the_paired_t_statistic():
    """The sequential choice's statistic equals scipy's paired t test on the per-image errors."""
    from scipy.stats import ttest_rel

    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, generator=g, dtype=torch.float64) * 10
    b = a - 0.3 + torch.randn(50, generator=g, dtype=torch.float64)
    assert sequential.paired_z(a, b) == pytest.approx(ttest_rel(a.numpy(), b.numpy()).statistic, rel=1e-10)
    assert sequential.paired_z(b, a) == pytest.approx(-sequential.paired_z(a, b), rel=1e-12)
    assert sequential.paired_z(a, a) == 0.0 and sequential.paired_z(a[:1], b[:1]) == 0.0
    n = torch.arange(50, dtype=torch.float64)
    assert sequential.paired_z(n + 1, n) == math.inf  # an exactly constant gain: certain


def test_lowrank_sparse_layers_count_their_dense_multiply_adds(data):
    """A low-rank + sparse layer runs its merged dense weight: no multiply-adds are saved."""
    res = compress(_tiny_cnn(), data, config_from_options(ratio=2.0, method="lrs", sequential=False, show_progress=False))
    assert res.report.macs_after == res.report.macs_before
