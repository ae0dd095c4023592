"""Every bad input ddtd has been tried on, with the message it must give.

One place for the whole list: a new input kind (a new file format, option or data type) adds its
bad cases here. Each case checks that the run stops with a message that says what to do next
(exit code 2 from the command line, no traceback), before the work where that can be checked,
and that nothing the user gave as input is changed.

Cases covered elsewhere: empty / missing / corrupt image folders, foreign or truncated stores,
fingerprint mismatches, TorchScript calibration, pickled modules and malicious pickles as
``--weights`` / ``--model`` (tests/test_store_cli.py, tests/test_model_io.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import pytest
import torch

from ddtd.config import CalibrationConfig, config_from_options
from ddtd.selection import layer_filter
from torch import nn

import ddtd
from conftest import tiny_net, write_images
from ddtd.calibration import CovarianceStore, calibrate, save_calibration
from ddtd.cli import main
from ddtd.errors import InputError, NumericalError
from ddtd.model_io import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
TRUST = ["--trust-factory", "conftest"]
SIZE = ["--size", "16", "--batch-size", "4", *TRUST]


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model as a factory + state dict and as a .ddtd file, 12 images, a store."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = tiny_net()
    model.ddtd_spec = {"source": "factory", "name": "conftest:tiny_net", "kwargs": {}}
    torch.save(model.state_dict(), root / "w.pt")
    save_model(model, root / "m.ddtd")
    imgs = root / "imgs"
    write_images(imgs, 12, size=(16, 16))
    assert main(["calibrate", "--model", str(root / "m.ddtd"), "--images", str(imgs), *SIZE,
                 "-o", str(root / "s.h5")]) == 0
    return root


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# 1. A model file never runs code it names -------------------------------------------------------

def _evil_file(path: Path, marker: Path, name="os:system", kwargs=None):
    kwargs = {"command": f"touch {marker}"} if kwargs is None else kwargs
    torch.save({"ddtd_format": 1, "spec": {"source": "factory", "name": name, "kwargs": kwargs},
                "state_dict": {}}, path)


def test_crafted_model_file_cannot_run_code(tmp_path, env, capsys):
    marker, evil = tmp_path / "PWNED", tmp_path / "e.ddtd"
    _evil_file(evil, marker)
    with pytest.raises(InputError, match="--trust-factory os") as exc:
        ddtd.load(evil)
    assert "not trusted" in str(exc.value)
    assert not marker.exists()
    code, _, err = _run(["eval", "--model", evil, "--images", env / "imgs", "--size", "16", "--no-latency"], capsys)
    assert code == 2 and "--trust-factory os" in err and not marker.exists()
    # trusting another module does not trust this one
    with pytest.raises(InputError, match="not trusted"):
        load_model(evil, trust_factory="conftest")
    assert not marker.exists()


def test_model_file_kwargs_are_plain_data_and_never_weights(tmp_path):
    for kwargs in ({"weights": "DEFAULT"}, {"weights_backbone": "x"}, {"num_classes": {"a": 1}}):
        path = tmp_path / "k.ddtd"
        torch.save({"ddtd_format": 1, "spec": {"source": "torchvision", "name": "resnet18", "kwargs": kwargs},
                    "state_dict": {}}, path)
        with pytest.raises(InputError, match="not allowed"):
            load_model(path)


def test_trusted_factory_loads_and_opt_in_is_per_module(env):
    with pytest.raises(InputError, match="--trust-factory conftest"):
        load_model(env / "m.ddtd")
    m = load_model(env / "m.ddtd", trust_factory="conftest")
    x = torch.randn(2, 3, 16, 16)
    ref = tiny_net()
    ref.load_state_dict(torch.load(env / "w.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref.eval()(x))
    assert isinstance(load_model("ddtd.zoo:vgg_fmnist"), nn.Module)  # a name typed by the user


# 2. Outputs never replace inputs ----------------------------------------------------------------

def _io_cases(env, tmp_path):
    w, m, s, imgs = env / "w.pt", env / "m.ddtd", env / "s.h5", env / "imgs"
    link = tmp_path / "link.pt"
    link.symlink_to(w)
    report_json = tmp_path / "r.json"
    report_json.write_text(json.dumps({"images": 1}))
    fac = ["--model", "conftest:tiny_net", "--weights", w]
    comp = ["compress", "--calib", s, "--ratio", "2", "--size", "16"]
    return {
        "compress -o = --weights": ([*comp, *fac, "-o", w], w),
        "compress -o = --weights (through a link)": ([*comp, *fac, "-o", link], w),
        "compress -o = --calib": ([*comp, *fac, "-o", s], s),
        "compress -o = --model": ([*comp, "--model", m, *TRUST, "-o", m], m),
        "compress --report-json = --weights": ([*comp, *fac, "-o", tmp_path / "o.ddtd", "--report-json", w], w),
        "compress --export target = --model": ([*comp, "--model", m.with_suffix(".ts"), "-o", m.with_suffix(".x"),
                                                "--export", "torchscript"], None),
        "calibrate -o = --weights": (["calibrate", *fac, "--images", imgs, *SIZE, "-o", w], w),
        "calibrate -o = --model": (["calibrate", "--model", m, "--images", imgs, *SIZE, "-o", m], m),
        "merge -o = a store": (["merge", s, s, "-o", s], s),
        "eval --json = --weights": (["eval", *fac, "--images", imgs, "--size", "16", "--json", w], w),
        "report --json = the file": (["report", report_json, "--json", report_json], report_json),
    }


def test_no_output_may_be_an_input(env, tmp_path, capsys, monkeypatch):
    # the refusal comes before any work: loading a model or calibrating would fail the test
    import ddtd.model_io as model_io

    def no_work(*a, **k):
        raise AssertionError("work started before the output check")

    monkeypatch.setattr(model_io, "load_model", no_work)
    shutil.copy(env / "m.ddtd", env / "m.ts")  # an existing model whose --export target would be itself
    try:
        for label, (argv, victim) in _io_cases(env, tmp_path).items():
            before = _sha(victim) if victim else None
            code, _, err = _run(argv, capsys)
            assert code == 2, (label, err)
            assert "is the input" in err or "the same" in err, (label, err)
            if victim:
                assert _sha(victim) == before, label
    finally:
        (env / "m.ts").unlink()


# 3. Bad numbers ----------------------------------------------------------------------------------

def test_nan_weights_are_refused_naming_the_parameter(env, tmp_path, capsys):
    sd = torch.load(env / "w.pt", weights_only=True)
    sd["conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    for cmd in (["compress", "--calib", env / "s.h5", "--ratio", "2", "--size", "16", "-o", tmp_path / "o.ddtd"],
                ["calibrate", "--images", env / "imgs", *SIZE, "-o", tmp_path / "o.h5"]):
        code, _, err = _run([*cmd, "--model", "conftest:tiny_net", "--weights", tmp_path / "nan.pt"], capsys)
        assert code == 2 and "conv2.weight" in err and "NaN" in err, err
    assert not (tmp_path / "o.ddtd").exists() and not (tmp_path / "o.h5").exists()
    model = tiny_net()
    model.load_state_dict(sd)
    with pytest.raises(NumericalError, match="conv2.weight"):
        ddtd.compress(model, torch.randn(4, 3, 16, 16), config_from_options(ratio=2, show_progress=False))


def _corrupt(path: Path, layer="conv3", value=8.8e307, checksum=True):
    with h5py.File(path, "r+") as f:
        ds = f[f"layers/{layer}/xxT"]
        arr = ds[()]
        arr[0, 0, 1] = value
        ds[...] = arr
        if not checksum:
            for g in f["layers"].values():
                for d in g.values():
                    d.attrs.pop("sha256", None)


def test_corrupted_store_is_refused(env, tmp_path, capsys):
    damaged = tmp_path / "d.h5"
    shutil.copy(env / "s.h5", damaged)
    _corrupt(damaged)
    with pytest.raises(InputError, match="conv3.*checksum"):
        CovarianceStore(damaged)["conv3"]
    code, _, err = _run(["compress", "--model", "conftest:tiny_net", "--weights", env / "w.pt", "--calib", damaged,
                         "--ratio", "2", "--size", "16", "-o", tmp_path / "o.ddtd"], capsys)
    assert code == 2 and "checksum" in err
    # a store without checksums (or damaged with its checksums rewritten) is checked numerically
    for value, what in ((8.8e307, "not symmetric"), (float("nan"), "NaN")):
        shutil.copy(env / "s.h5", damaged)
        _corrupt(damaged, value=value, checksum=False)
        with pytest.raises(InputError, match=what):
            CovarianceStore(damaged)["conv3"]
    shutil.copy(env / "s.h5", damaged)
    with h5py.File(damaged, "r+") as f:  # symmetric, but not a covariance: a large negative eigenvalue
        ds = f["layers/conv3/xxT"]
        arr = ds[()]
        arr[0, 0, 1] = arr[0, 1, 0] = 10 * abs(arr[0]).max()
        ds[...] = arr
        for d in f["layers/conv3"].values():
            d.attrs.pop("sha256", None)
    with pytest.raises(InputError, match="positive semidefinite"):
        CovarianceStore(damaged)["conv3"]
    store = CovarianceStore(env / "s.h5")  # the intact store passes every check
    assert all(lm.count > 0 for _, lm in store.items())


def test_damaged_store_metadata_is_a_message(env, tmp_path, capsys):
    damaged = tmp_path / "meta.h5"
    shutil.copy(env / "s.h5", damaged)
    with h5py.File(damaged, "r+") as f:
        del f.attrs["num_images"]
    code, _, err = _run(["info", damaged], capsys)
    assert code == 2 and "metadata" in err and "damaged" in err


def test_zero_variance_images_warn_and_errors_are_never_negative(tmp_path, caplog):
    torch.manual_seed(0)
    model = tiny_net()
    with caplog.at_level(logging.WARNING, logger="ddtd"):
        res = ddtd.compress(model, torch.zeros(16, 3, 16, 16), config_from_options(ratio=1.5, strategy="uniform", show_progress=False), filter_fn=layer_filter(model, include_first=True))
    assert "zero variance" in caplog.text
    errs = [r.sigma_error for r in res.report.layers if r.sigma_error is not None]
    assert errs and all(e >= 0 for e in errs), errs


# 4. Eval folders that do not match the model -----------------------------------------------------

@pytest.mark.parametrize("classes", [3, 12])
def test_eval_refuses_class_folders_that_do_not_match(env, tmp_path, capsys, classes):
    imgs = tmp_path / f"c{classes}"
    write_images(imgs, classes, size=(16, 16), classes=tuple(f"k{i:02d}" for i in range(classes)))
    code, _, err = _run(["eval", "--model", env / "m.ddtd", *TRUST, "--images", imgs, "--size", "16",
                         "--no-latency"], capsys)
    assert code == 2 and f"{classes} class folders" in err and "5 outputs" in err and "sorted" in err
    code, out, _ = _run(["eval", "--model", env / "m.ddtd", "--reference", env / "m.ddtd", *TRUST, "--images", imgs,
                         "--size", "16", "--no-latency", "--no-labels"], capsys)
    assert code == 0 and "agreement with the reference: 100.00%" in out and "accuracy" not in out


# 5. Tracebacks that are now messages -------------------------------------------------------------

def test_errors_are_messages_with_exit_code_2(env, tmp_path, capsys):
    w, s = env / "w.pt", env / "s.h5"
    fac = ["--model", "conftest:tiny_net", "--weights", w]
    comp = ["compress", *fac, "--calib", s, "--ratio", "2", "--size", "16"]
    fake_ts = tmp_path / "fake.pt"
    with zipfile.ZipFile(fake_ts, "w") as zf:
        zf.writestr("fake/code/__torch__.py", "not torchscript")
        zf.writestr("fake/constants.pkl", b"junk")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    (tmp_path / "outdir").mkdir()
    cases = {
        "--device gpu0": ([*comp, "--device", "gpu0", "-o", tmp_path / "o.ddtd"], "unknown device"),
        "-o an existing directory": ([*comp, "-o", tmp_path / "outdir"], "is a directory"),
        "report of a broken JSON file": (["report", bad_json], "not valid JSON"),
        "report of a missing file": (["report", tmp_path / "missing.ddtd"], "not found"),
        "a zip that looks like TorchScript": (["eval", "--model", fake_ts, "--images", env / "imgs", "--size", "16",
                                               "--no-latency"], "TorchScript"),
        "a factory without num_classes": (["calibrate", "--model", "conftest:tiny_net", "--num-classes", "10",
                                           "--images", env / "imgs", *SIZE, "-o", tmp_path / "x.h5"], "num_classes"),
        "a model with no Conv2d / Linear": (["calibrate", "--model", "torch.nn:Identity", "--images", env / "imgs",
                                             *SIZE, "-o", tmp_path / "y.h5"], None),
    }
    if not torch.cuda.is_available():
        cases["--device cuda without a GPU"] = ([*comp, "--device", "cuda", "-o", tmp_path / "o.ddtd"], "no CUDA")
    for label, (argv, text) in cases.items():
        code, _, err = _run(argv, capsys)
        assert code == 2, (label, err)
        assert "next step" in err or "error:" in err, (label, err)
        if text:
            assert text in err, (label, err)
    assert not (tmp_path / "o.ddtd").exists()


@pytest.mark.parametrize("argv, text", [
    (["--rank", "abc"], "expected an int rank"),
    (["--rank", "0"], "at least 1"),
    (["--rank", "0.5"], "ratio must be"),
    (["--ratio", "0.5"], "> 1"),
    (["--ratio", "inf"], "> 1"),
    (["--error", "1.5"], "(0, 1)"),
    (["--num-images", "0"], "at least 1"),
    (["--sparsity", "2"], "[0, 1]"),
])
def test_out_of_range_options_are_refused_by_the_parser(env, tmp_path, capsys, argv, text):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", "conftest:tiny_net", "--calib", str(env / "s.h5"), "--size", "16",
              *(["--ratio", "2"] if "--ratio" not in argv and "--rank" not in argv and "--error" not in argv else []),
              *argv, "-o", str(tmp_path / "o.ddtd")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


def test_api_refuses_out_of_range_requests_before_calibrating(monkeypatch):
    import ddtd.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("calibration started before the request was checked")

    monkeypatch.setattr(pipeline, "calibrate", no_work)
    monkeypatch.setattr(pipeline, "prepare", no_work)
    model, x = tiny_net(), torch.randn(4, 3, 16, 16)
    for kw, text in (({"ratio": 0.5}, "ratio"), ({"ratio": float("inf")}, "ratio"), ({"error": 2.0}, "error 2.0 is out of range"),
                     ({"rank": 0}, "rank"), ({"rank": "abc"}, "rank"), ({"ratio": 2, "method": "nope"}, "nope"),
                     ({"ratio": 2, "norm": "l1"}, "norm"), ({"ratio": 2, "device": "gpu0"}, "device")):
        with pytest.raises(InputError, match=text):
            ddtd.compress(model, x, config_from_options(**kw))
    with pytest.raises(InputError, match="no Conv2d or Linear"):
        ddtd.compress(nn.Sequential(nn.ReLU()), x, config_from_options(ratio=2))


def test_broken_pipe_is_quiet(env):
    """`ddtd info STORE | head`: the reader goes away before ddtd writes; no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "ddtd", "info", str(env / "s.h5")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # closed long before the child has imported torch and printed
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# 6. Interruptions --------------------------------------------------------------------------------

def test_ctrl_c_while_a_store_is_written_exits_130_and_keeps_the_old_file(env, tmp_path):
    a, b, out = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "out.h5"
    model = load_model(env / "m.ddtd", trust_factory="conftest")
    for path in (a, b, out):
        save_calibration(calibrate(model, torch.randn(4, 3, 16, 16), CalibrationConfig(show_progress=False)), path)
    before = _sha(out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        import ddtd.calibration.store as st
        from ddtd.cli import main
        reads = []
        original = st.CovarianceStore.__getitem__
        def read(self, name):
            reads.append(name)
            if len(reads) == 3:  # the first layer is written, the second is being read: Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            return original(self, name)
        st.CovarianceStore.__getitem__ = read
        sys.exit(main(["merge", {str(a)!r}, {str(b)!r}, "-o", {str(out)!r}]))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 130, p.stderr
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr and "Exception ignored" not in p.stderr
    assert _sha(out) == before
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_stale_temporary_files_are_removed_on_the_next_run(env, tmp_path, caplog):
    out = tmp_path / "s.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.h5.ddtd-{int(dead.stdout)}-0badcafe.tmp"
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".s.h5.ddtd-{os.getppid()}-0123abcd.tmp"  # a writer still running: kept
    alive.write_bytes(b"y")
    model = load_model(env / "m.ddtd", trust_factory="conftest")
    with caplog.at_level(logging.WARNING, logger="ddtd"):
        save_calibration(calibrate(model, torch.randn(2, 3, 16, 16), CalibrationConfig(show_progress=False)), out)
    assert not stale.exists() and alive.exists() and out.exists()
    assert "interrupted ddtd run" in caplog.text


# 7. Smaller ones ---------------------------------------------------------------------------------

def test_output_file_modes_follow_umask_and_keep_the_old_mode(env, tmp_path, capsys):
    out = tmp_path / "s.h5"
    old = os.umask(0o022)
    try:
        argv = ["calibrate", "--model", env / "m.ddtd", "--images", env / "imgs", *SIZE, "-o", out]
        assert _run(argv, capsys)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o644
        out.chmod(0o640)
        assert _run(argv, capsys)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_unsupported_layers_are_listed_as_dense():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
            self.line = nn.Conv1d(16, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.conv2(torch.relu(self.up(torch.relu(self.conv(x)))))
            x = self.line(x.flatten(2)).mean(-1)
            return self.fc(x)

    torch.manual_seed(0)
    res = ddtd.compress(Mixed(), torch.randn(8, 3, 8, 8), config_from_options(rank=2, show_progress=False))
    rows = {r.name: r for r in res.report.layers}
    for name, kind in (("up", "ConvTranspose2d"), ("line", "Conv1d")):
        assert rows[name].method == "dense" and kind in rows[name].note and "not supported" in rows[name].note


def test_merging_a_store_with_itself_is_refused(env, tmp_path, capsys):
    copy = tmp_path / "copy.h5"
    shutil.copy(env / "s.h5", copy)
    for argv in (["merge", env / "s.h5", env / "s.h5", "-o", tmp_path / "m.h5"],
                 ["merge", env / "s.h5", copy, "-o", tmp_path / "m.h5"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "twice" in err
    assert not (tmp_path / "m.h5").exists()
