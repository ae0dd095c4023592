"""Every stage on a CUDA GPU, checked against the same stage on the CPU.

Calibration (every moment algorithm and a whole ``ddtd.calibrate``), every solver, a whole
``ddtd.compress`` per method, and the command line (calibrate, compress, reload, eval) run with
``device="cuda"`` and must give the CPU's results within the tolerances below: float32
activations summed into float64 moments, float64 solvers whose factors are rounded to float32.
TF32 is switched off for the module, so cuBLAS / cuDNN products are true float32 like the CPU's.

Every test is marked ``gpu`` (``pytest -m gpu``) and skipped when no GPU is available.
Two environment variables change that:

* ``DDTD_TEST_DEVICE=cpu`` runs the same tests with the CPU as the "device" (a smoke run that
  proves the test code itself works on a machine without a GPU; the comparisons are then
  CPU against CPU);
* ``DDTD_REQUIRE_GPU=1`` makes a missing GPU an error instead of a skip
  (``benchmarks/gpu_check.sh`` sets it, so a GPU check cannot pass by skipping).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

import pytest
import torch

from ddtd.config import CalibrationConfig, config_from_options
from ddtd.selection import layer_filter
from torch import nn

from conftest import tiny_net, write_images
from test_compress import _cli_model_and_images, _randomise_bn, small_cnn

import ddtd
from ddtd import solvers as S
from ddtd.calibration.moments import conv_geometry, conv_input_moments, conv_moment_blocks
from ddtd.cli import main
from ddtd.data import ImageTransform
from ddtd.methods import METHODS
from ddtd.model_io import load_model
from ddtd.pipeline import prepare, stored_units
from synthetic import activation_images, activation_sigma, structured_kernel

DEVICE = torch.device(os.environ.get("DDTD_TEST_DEVICE", "cuda"))
REQUIRE_GPU = os.environ.get("DDTD_REQUIRE_GPU") == "1"
ON_GPU = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(ON_GPU and not REQUIRE_GPU and not torch.cuda.is_available(),
                       reason="no CUDA GPU (DDTD_TEST_DEVICE=cpu runs these tests on the CPU)"),
]

#: Moments: float32 products of the same inputs, summed in another order (cuBLAS against
#: oneDNN) into float64: relative Frobenius difference (the largest entry difference may be 10x
#: that, relative to the largest entry). Every algorithm's float32 result is within 1e-6 of the
#: float64 sums on these inputs (measured), so each device is, and so are they of each other.
MOMENT_RTOL = 1e-5
#: Whole-model calibration: the layers' inputs come from the devices' own forward passes
#: (cuDNN may pick Winograd / FFT kernels, float32 rounding of another order), a few layers deep.
CALIB_RTOL = 1e-4
#: Solver errors: exact solvers (Sigma-SVD) to float64 rounding through float32 factors;
#: iterative ones (ALS, CG, support selection) may take a slightly different path: a whole
#: compression on an H200 differed from the CPU's by up to 0.8% of a layer's error (lrs, cp3).
EXACT_RTOL = 1e-5
ITERATIVE_RTOL = 2e-2
#: Compressed models' outputs (same plan, float32 forward passes): relative difference.
OUTPUT_RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _device_ready():
    """Fail (not skip) without a GPU when one is required; no TF32 while the module runs."""
    if ON_GPU and not torch.cuda.is_available():
        pytest.fail("DDTD_REQUIRE_GPU=1 but torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU (0 when both are zero)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else float(a.norm())


def _assert_moments_close(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = MOMENT_RTOL) -> None:
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    assert _rel(got, ref) <= rtol, (what, _rel(got, ref))
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 10 * rtol * max(scale, 1e-30), what


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


# ------------------------------------------------------------------------------ calibration

#: Conv geometries that reach every moment algorithm: a stride-1 3x3 conv (lag products, fast
#: Toom-Cook correlations), a strided one (gathered patches, space-to-depth), a grouped one, a
#: tiny map (whole-input moments), a dilated conv with reflect padding, and an RGB stem.
GEOMETRIES = {
    "3x3": (nn.Conv2d(16, 16, 3, padding=1), (5, 16, 12, 12)),
    "3x3-stride2": (nn.Conv2d(16, 24, 3, stride=2, padding=1), (5, 16, 11, 11)),
    "3x3-groups2": (nn.Conv2d(16, 16, 3, padding=1, groups=2), (5, 16, 9, 9)),
    "3x3-tiny-map": (nn.Conv2d(16, 16, 3, padding=1), (6, 16, 4, 4)),
    "3x3-dilated-reflect": (nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect"), (4, 8, 10, 10)),
    "5x5-stem": (nn.Conv2d(3, 8, 5, stride=2, padding=2), (3, 3, 12, 12)),
    "1x1": (nn.Conv2d(16, 12, 1), (4, 16, 7, 7)),
}
MOMENT_METHODS = ("auto", "auto-direct", "dense", "gather", "unfold", "lag", "lag-whole", "lag-cells",
                  "lag-fast", "lag-direct", "lag-s2d")


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_every_moment_algorithm_matches_the_cpu(geometry):
    """Each moment algorithm (``conv_moment_blocks(method=...)``) on device inputs gives the CPU
    sums, for Sigma and for the cross moment of two inputs; an algorithm that refuses a
    geometry refuses it on both."""
    conv, shape = GEOMETRIES[geometry]
    geo = conv_geometry(conv)
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=g) + 0.3)
    y = x + 0.1 * torch.randn(shape, generator=g)
    ran = 0
    for method in MOMENT_METHODS:
        if method == "dense" and shape[2] * shape[3] > 16:
            continue  # whole-input moments are for tiny maps (their plan grows as positions^2)
        for cross in (None, y):
            try:
                ref, ref_sum, ref_n = conv_input_moments(x, geo, method=method, y=cross)
            except ValueError:
                with pytest.raises(ValueError):
                    conv_input_moments(x.to(DEVICE), geo, method=method,
                                       y=None if cross is None else cross.to(DEVICE))
                continue
            got, got_sum, got_n = conv_input_moments(x.to(DEVICE), geo, method=method,
                                                     y=None if cross is None else cross.to(DEVICE))
            what = f"{geometry} {method} {'cross' if cross is not None else 'sigma'}"
            assert _on_device(got) and _on_device(got_sum), what
            assert got_n == ref_n, what
            _assert_moments_close(got, ref, what)
            _assert_moments_close(got_sum, ref_sum, what + " sum")
            ran += 1
    assert ran >= 4, geometry  # most algorithms apply to every geometry


def test_fast_correlation_blocks_on_the_device():
    """The fast lag correlations (Toom-Cook transforms built on the CPU) run on device inputs."""
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.relu(torch.randn(4, 64, 14, 14, generator=torch.Generator().manual_seed(1)))
    ref, ref_sum, _ = conv_moment_blocks(x, conv_geometry(conv), method="lag-fast")
    got, got_sum, _ = conv_moment_blocks(x.to(DEVICE), conv_geometry(conv), method="lag-fast")
    assert set(got) == set(ref)
    for key in ref:
        _assert_moments_close(got[key], ref[key], f"block {key}")
    _assert_moments_close(got_sum, ref_sum, "sum")


class _WideNet(nn.Module):
    """Convs wide enough for the lag / fast-correlation paths, plus the tiny net's kinds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 7)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("net", ["tiny", "wide"])
def test_calibration_on_the_device_equals_the_cpu(tmp_path, net):
    """``ddtd.calibrate`` on an image folder with ``device=DEVICE``: same layers, counts and
    float64 sums as on the CPU; the accumulators live on the device."""
    torch.manual_seed(0)
    model = tiny_net() if net == "tiny" else _WideNet()
    imgs = tmp_path / "imgs"
    write_images(imgs, 24, size=(20, 20))
    tf = ImageTransform(size=16)
    ref = ddtd.calibrate(copy.deepcopy(model), imgs, CalibrationConfig(transform=tf, batch_size=8, show_progress=False), device="cpu")
    got = ddtd.calibrate(copy.deepcopy(model), imgs, CalibrationConfig(transform=tf, batch_size=8, show_progress=False), device=DEVICE)
    assert set(got.moments) == set(ref.moments) == {n for n, m in model.named_modules()
                                                    if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert got.info.num_images == ref.info.num_images == 24
    for name, lm in ref.moments.items():
        g = got.moments[name]
        assert _on_device(g.xxT), name
        assert g.count == lm.count, name
        _assert_moments_close(g.xxT, lm.xxT, f"{name} xxT", CALIB_RTOL)
        _assert_moments_close(g.x_sum, lm.x_sum, f"{name} x_sum", CALIB_RTOL)
    # a store written from device moments reads back as the same numbers
    from ddtd.calibration import CovarianceStore, save_calibration

    save_calibration(got, tmp_path / "s.h5")
    store = CovarianceStore(tmp_path / "s.h5")
    for name in ref.moments:
        torch.testing.assert_close(store[name].xxT, got.moments[name].xxT.cpu(), rtol=0, atol=0)


# ------------------------------------------------------------------------------ solvers

def _problem(T=24, Sin=16, k=3, seed=0):
    """A trained-like kernel and a realistic (ReLU activation) centred Sigma, float32 / float64."""
    W = structured_kernel(T, Sin, k, seed=seed)
    sigma = activation_sigma(Sin, k, n_images=24, size=12, seed=seed)
    return W, sigma


def _tensors(obj, prefix=""):
    """(path, tensor) of every tensor inside a solver result (dataclass fields, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), f"{prefix}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}[{k!r}]")


def _grouped(W, sigma, g):
    """The same problem as a grouped conv: Sigma per group (its diagonal blocks)."""
    Dg = sigma.shape[0] // g
    return W[:, : W.shape[1] // g].contiguous(), torch.stack(
        [sigma[i * Dg:(i + 1) * Dg, i * Dg:(i + 1) * Dg] for i in range(g)])


def _solver_cases():
    """name -> (call(weight, sigma) -> result, relative tolerance of its error)."""
    cfg = dict(max_iter=25, seed=0)
    return {
        "sigma_svd": (lambda w, s: S.sigma_svd(w, s, 6), EXACT_RTOL),
        "sigma_svd-frobenius": (lambda w, s: S.sigma_svd(w, None, 6), EXACT_RTOL),
        "sigma_svd-grouped": (lambda w, s: S.sigma_svd(*_grouped(w, s, 2), 4), EXACT_RTOL),
        "sigma_svd_cross": (lambda w, s: S.sigma_svd_cross(w, s, 0.9 * s, 0.8 * s + 0.01 * torch.eye(
            s.shape[0], dtype=s.dtype, device=s.device), 6), EXACT_RTOL),
        "tucker2": (lambda w, s: S.tucker2(w, s, (10, 8), **cfg), ITERATIVE_RTOL),
        "tucker2-grouped": (lambda w, s: S.tucker2(*_grouped(w, s, 2), (6, 4), **cfg), ITERATIVE_RTOL),
        "cp3": (lambda w, s: S.cp3(w, s, 16, **cfg), ITERATIVE_RTOL),
        "cp4": (lambda w, s: S.cp4(w, s, 16, **cfg), ITERATIVE_RTOL),
        "cp3-frobenius": (lambda w, s: S.cp3(w, None, 16, **cfg), ITERATIVE_RTOL),
        "stable_cp3": (lambda w, s: S.stable_cp3(w, s, 12, max_sweeps=8, cp_options=cfg), ITERATIVE_RTOL),
        "stable_cp4": (lambda w, s: S.stable_cp4(w, s, 12, max_sweeps=8, cp_options=cfg), ITERATIVE_RTOL),
        "lowrank_sparse": (lambda w, s: S.lowrank_sparse(w, s, 4, 300, max_iter=6), ITERATIVE_RTOL),
        "lowrank_sparse-tucker2": (lambda w, s: S.lowrank_sparse(w, s, (6, 6), 200, lowrank="tucker2",
                                                                 max_iter=4), ITERATIVE_RTOL),
        "lowrank_sparse-grouped": (lambda w, s: S.lowrank_sparse(*_grouped(w, s, 2), 3, 200, max_iter=4),
                                   ITERATIVE_RTOL),
        "split_budget": (lambda w, s: S.split_budget(w, s, 1500, max_iter=3)[2], ITERATIVE_RTOL),
        "sigma_prune": (lambda w, s: S.sigma_prune(w, s, 400), EXACT_RTOL),
        "magnitude_prune": (lambda w, s: S.magnitude_prune(w, s, 400), EXACT_RTOL),
    }


@pytest.mark.parametrize("case", sorted(_solver_cases()))
def test_every_solver_runs_on_the_device_and_matches_the_cpu(case):
    """Weight and Sigma on the device: every tensor of the result is on the device, and the
    relative Sigma error is the CPU's within the case's tolerance."""
    call, rtol = _solver_cases()[case]
    W, sigma = _problem()
    ref = call(W, sigma)
    got = call(W.to(DEVICE), sigma.to(DEVICE))
    tensors = list(_tensors(got))
    assert tensors, case
    off = [p for p, t in tensors if not _on_device(t)]
    assert not off, f"{case}: result tensors not on {DEVICE}: {off}"
    assert type(got) is type(ref)
    assert math.isfinite(got.rel_error) and 0 <= got.rel_error < 1, (case, got.rel_error)
    assert abs(got.rel_error - ref.rel_error) <= rtol * ref.rel_error + 1e-7, (case, got.rel_error,
                                                                                 ref.rel_error)
    for k, v in getattr(got, "info", {}).items():  # report extras stay plain numbers
        assert not isinstance(v, torch.Tensor), (case, k)


@pytest.mark.parametrize("solver", ["sigma_svd", "tucker2", "cp3", "stable_cp4", "lowrank_sparse", "sigma_prune"])
def test_solvers_move_cpu_inputs_to_the_device_argument(solver):
    """``device=``: CPU weight and Sigma in, every result tensor on that device, the same error."""
    W, sigma = _problem(T=16, Sin=8)
    calls = {
        "sigma_svd": lambda **kw: S.sigma_svd(W, sigma, 4, **kw),
        "tucker2": lambda **kw: S.tucker2(W, sigma, (6, 4), max_iter=10, **kw),
        "cp3": lambda **kw: S.cp3(W, sigma, 8, max_iter=10, **kw),
        "stable_cp4": lambda **kw: S.stable_cp4(W, sigma, 8, max_sweeps=4, cp_options={"max_iter": 10}, **kw),
        "lowrank_sparse": lambda **kw: S.lowrank_sparse(W, sigma, 2, 100, max_iter=4, **kw),
        "sigma_prune": lambda **kw: S.sigma_prune(W, sigma, 200, **kw),
    }
    ref, got = calls[solver](), calls[solver](device=DEVICE)
    off = [p for p, t in _tensors(got) if not _on_device(t)]
    assert not off, f"{solver}: result tensors not on {DEVICE}: {off}"
    assert abs(got.rel_error - ref.rel_error) <= ITERATIVE_RTOL * ref.rel_error + 1e-7
    assert all(math.isfinite(v) for v in got.info.values() if isinstance(v, float))


def test_svd_factors_give_the_cpu_weight():
    """The Sigma-SVD is exact: its weight ``A @ B`` (eigenvector signs aside) is the CPU's."""
    W, sigma = _problem()
    ref, got = S.sigma_svd(W, sigma, 6), S.sigma_svd(W.to(DEVICE), sigma.to(DEVICE), 6)
    assert _rel(got.A @ got.B, ref.A @ ref.B) <= 1e-4


# ------------------------------------------------------------------------------ whole compress

@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _randomise_bn(small_cnn(width=8))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    base = torch.randn(64, 3, 4, 4)
    x = nn.functional.interpolate(base, size=16, mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn_like(x)


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp3", "lrs", "auto"])
def test_whole_compress_on_the_device_matches_the_cpu(net, data, method):
    """``ddtd.compress(ratio=2, device=DEVICE)``: the caller's model stays where it was, the
    compressed model lives and runs on the device, its plan and report are the CPU run's, and
    its outputs are the CPU-compressed model's within OUTPUT_RTOL."""
    kw = dict(ratio=2, method=method, max_iter=10, show_progress=False)
    ref = ddtd.compress(net, data, config_from_options(**kw))
    got = ddtd.compress(net, data, config_from_options(device=DEVICE, **kw))
    assert all(p.device.type == "cpu" for p in net.parameters())  # the original is not moved
    model = got.model
    assert all(_on_device(t) for t in list(model.parameters()) + list(model.buffers()))
    x = data[:16]
    with torch.no_grad():
        y_got = model(x.to(DEVICE))
        y_ref = ref.model(x)
        y_orig = net(x)
    assert _on_device(y_got)
    assert _rel(y_got, y_ref) <= OUTPUT_RTOL, _rel(y_got, y_ref)
    assert _rel(y_got, y_orig) < 1.0  # a model, not noise

    # the report: complete, JSON-clean, the CPU run's plan
    rep, rrep = got.report, ref.report
    folded, _ = prepare(net)
    assert sorted(r.name for r in rep.layers) == sorted(_layers(folded))
    plan = [(r.name, r.method, r.ranks, r.params_after, r.macs_after) for r in rep.layers]
    assert plan == [(r.name, r.method, r.ranks, r.params_after, r.macs_after) for r in rrep.layers]
    fitted = [r for r in rep.layers if r.method != "dense"]
    assert fitted, "nothing was compressed"
    for r in fitted:
        assert r.method in METHODS, r.method
        assert 0 < r.params_after < r.params_before and r.macs_before > 0, r
        assert r.sigma_error is None or 0 <= r.sigma_error < 1, r
        e_ref = next(x.sigma_error for x in rrep.layers if x.name == r.name)
        if r.sigma_error is not None:
            assert abs(r.sigma_error - e_ref) <= ITERATIVE_RTOL * e_ref + 1e-6, (r.name, r.sigma_error, e_ref)
    assert rep.params_before == sum(p.numel() for p in folded.parameters())
    assert rep.params_after == stored_units(model)
    assert rep.macs_before > 0 and 0 < rep.macs_after <= rep.macs_before
    assert rep.ratio > 1.5, rep.ratio
    assert {"calibrate", "solve", "total"} <= set(rep.seconds)
    json.dumps(rep.to_dict())  # no tensor anywhere in the report


def test_compress_accepts_device_inputs(net, data):
    """Calibration data already on the device is fine too."""
    res = ddtd.compress(net, data.to(DEVICE), config_from_options(ratio=2, method="svd", device=DEVICE, show_progress=False))
    with torch.no_grad():
        assert _on_device(res.model(data[:4].to(DEVICE)))


# ------------------------------------------------------------------------------ command line

def test_cli_compress_reload_and_eval_on_the_device(tmp_path, capsys):
    """``ddtd calibrate / compress / eval --device DEVICE`` on a saved model file: the files
    reload on the device with the same outputs as on the CPU, and eval reports agreement and
    device latency."""
    src, imgs = _cli_model_and_images(tmp_path)
    dev = str(DEVICE)
    common = ["--trust-factory", "test_compress", "--size", "16", "--device", dev]
    store = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(src), "--images", str(imgs), *common, "-o", str(store)]) == 0
    out_a = tmp_path / "svd.ddtd"
    rep_json = tmp_path / "svd.json"
    assert main(["compress", "--model", str(src), "--images", str(imgs), *common, "--ratio", "2",
                 "--method", "svd", "-o", str(out_a), "--report-json", str(rep_json)]) == 0
    out_b = tmp_path / "tucker2.ddtd"
    assert main(["compress", "--model", str(src), "--calib", str(store), *common, "--ratio", "2",
                 "--method", "tucker2", "--max-iter", "8", "-o", str(out_b)]) == 0
    rep = json.loads(rep_json.read_text())
    assert rep["ratio"] > 1.5 and any(r["method"] == "svd" for r in rep["layers"])

    x = torch.randn(4, 3, 16, 16)
    for out in (out_a, out_b):
        on_dev = load_model(out, device=DEVICE, trust_factory="test_compress")
        on_cpu = load_model(out, trust_factory="test_compress")
        assert all(_on_device(p) for p in on_dev.parameters())
        with torch.no_grad():
            assert _rel(on_dev(x.to(DEVICE)), on_cpu(x)) <= 1e-5

    capsys.readouterr()
    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", str(out_a), "--reference", str(src), "--images", str(imgs), *common,
                 "--no-labels", "--json", str(ev)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(ev.read_text())
    assert res["images"] == 16 and 0 <= res["agreement"] <= 1 and res["relative_output_error"] < 1
    assert res["latency_ms"] and res["reference_latency_ms"], res
    assert "top-1 agreement" in printed and "latency" in printed
