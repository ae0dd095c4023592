"""Store, CLI, append / merge, and every bad input of the calibration stage."""

import json
import os
import shutil

import h5py
import pytest
import torch

from ddtd.config import CalibrationConfig
from torch import nn

import ddtd.calibration.run as run_mod
from conftest import tiny_net, write_images
from ddtd.calibration import CovarianceStore, MomentCollector, calibrate, save_calibration
from ddtd.cli import main
from ddtd.errors import InputError, NumericalError, StoreMismatchError
from ddtd.model_io import load_model, save_model

SIZE = ["--size", "16", "--batch-size", "4", "--trust-factory", "conftest"]


def _model_file(tmp_path, channels=3, seed=0):
    torch.manual_seed(seed)
    model = tiny_net(channels)
    model.ddtd_spec = {"source": "factory", "name": "conftest:tiny_net", "kwargs": {"channels": channels}}
    path = tmp_path / f"tiny{channels}_{seed}.ddtd"
    save_model(model, path)
    return path


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def _sums(path):
    store = CovarianceStore(path)
    return {n: (lm.xxT, lm.x_sum, lm.count) for n, lm in store.items()}


def _assert_same_sums(a, b, rtol=1e-6):
    """Equal up to float32 summation order: error relative to the largest entry."""
    assert a.keys() == b.keys()
    for name in a:
        for i in (0, 1):
            scale = b[name][i].abs().max().item()
            torch.testing.assert_close(a[name][i], b[name][i], rtol=0, atol=rtol * scale)
        assert a[name][2] == b[name][2]


def test_store_layout_and_attributes(tmp_path):
    model = _model_file(tmp_path)
    imgs = tmp_path / "imgs"
    write_images(imgs, 10)
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(model), "--images", str(imgs), *SIZE, "-o", str(out)]) == 0
    with h5py.File(out, "r") as f:  # readable by plain h5py, no ddtd needed
        assert f.attrs["num_images"] == 10
        assert json.loads(f.attrs["transform"])["size"] == 16
        layers = json.loads(f.attrs["layers"])
        assert [layer[0] for layer in layers] == ["conv1", "conv2", "conv3", "fc"]
        g = f["layers/conv2"]
        assert g["xxT"].shape == (2, 36, 36) and g["x_sum"].shape == (2, 36)
        assert g.attrs["groups"] == 2 and list(g.attrs["stride"]) == [2, 2]
        assert list(g.attrs["padding"]) == [1, 1, 1, 1] and g.attrs["unfold_order"] == "channel,row,col"
        assert g["count"][()] == 10 * 8 * 8
        assert f["layers/fc"]["count"][()] == 10 * 64  # one sample per token of the 3-D input
    assert _no_temp_files(tmp_path) == []


def test_append_and_merge_equal_one_run(tmp_path):
    model = _model_file(tmp_path)
    all_dir, a_dir, b_dir = tmp_path / "all", tmp_path / "a", tmp_path / "b"
    paths = write_images(all_dir, 24)
    for i, p in enumerate(paths):
        dst = (a_dir if i < 12 else b_dir) / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    common = ["--model", str(model), *SIZE]
    assert main(["calibrate", *common, "--images", str(all_dir), "-o", str(tmp_path / "all.h5")]) == 0
    assert main(["calibrate", *common, "--images", str(a_dir), "-o", str(tmp_path / "a.h5")]) == 0
    assert main(["calibrate", *common, "--images", str(b_dir), "-o", str(tmp_path / "b.h5")]) == 0
    shutil.copy(tmp_path / "a.h5", tmp_path / "ab.h5")
    assert main(["calibrate", *common, "--images", str(b_dir), "--append", "-o", str(tmp_path / "ab.h5")]) == 0
    assert main(["merge", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "-o", str(tmp_path / "m.h5")]) == 0
    ref = _sums(tmp_path / "all.h5")
    _assert_same_sums(_sums(tmp_path / "ab.h5"), ref)
    _assert_same_sums(_sums(tmp_path / "m.h5"), ref)
    assert CovarianceStore(tmp_path / "m.h5").info.num_images == 24
    assert CovarianceStore(tmp_path / "ab.h5").info.num_images == 24
    assert len(CovarianceStore(tmp_path / "ab.h5").info.sources) == 2


def test_empty_folder_is_an_error_and_writes_nothing(tmp_path, capsys):
    model = _model_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(model), "--images", str(empty), *SIZE, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no image files under" in err and "1 other files" in err and "next step" in err
    assert not out.exists() and _no_temp_files(tmp_path) == []


def test_missing_folder_is_an_error(tmp_path, capsys):
    model = _model_file(tmp_path)
    assert main(["calibrate", "--model", str(model), "--images", str(tmp_path / "nope"), *SIZE,
                 "-o", str(tmp_path / "s.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    model = _model_file(tmp_path)
    imgs = tmp_path / "imgs"
    write_images(imgs, 6)
    (imgs / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (imgs / "a" / "readme.md").write_text("hello")
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(model), "--images", str(imgs), *SIZE, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ignored 1 unreadable image files and 1 non-image files" in text and "broken.png" in text
    assert CovarianceStore(out).info.num_images == 6


def test_only_corrupt_images_is_an_error(tmp_path, capsys):
    model = _model_file(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"x{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(model), "--images", str(imgs), *SIZE, "-o", str(out)]) == 2
    assert "none of the 3 image files" in capsys.readouterr().err
    assert not out.exists() and _no_temp_files(tmp_path) == []


def test_store_of_another_model_is_refused_naming_the_layer(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    write_images(imgs, 4)
    m3 = _model_file(tmp_path, channels=3)
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(m3), "--images", str(imgs), *SIZE, "-o", str(out)]) == 0
    before = out.read_bytes()
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten())
    other.ddtd_spec = None
    with pytest.raises(StoreMismatchError, match=r"layer '0' is in the model but not in the store|layer #0"):
        CovarianceStore(out).check_model(other)
    # Same names, different shape: the message names the layer and both shapes.
    m1 = _model_file(tmp_path, channels=1)
    assert main(["calibrate", "--model", str(m1), "--images", str(imgs), *SIZE, "--append", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "layer 'conv1' is Conv2d (8, 3, 3, 3) in the store but Conv2d (8, 1, 3, 3) in the model" in err
    assert out.read_bytes() == before and _no_temp_files(tmp_path) == []
    # merge refuses too
    m1_store = tmp_path / "m1.h5"
    assert main(["calibrate", "--model", str(m1), "--images", str(imgs), *SIZE, "-o", str(m1_store)]) == 0
    assert main(["merge", str(out), str(m1_store), "-o", str(tmp_path / "m.h5")]) == 2
    assert "different models" in capsys.readouterr().err and not (tmp_path / "m.h5").exists()


def test_not_a_store_is_refused(tmp_path):
    bogus = tmp_path / "x.h5"
    bogus.write_bytes(b"this is not hdf5")
    with pytest.raises(InputError, match="cannot read"):
        CovarianceStore(bogus)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["data"] = [1, 2]
    with pytest.raises(InputError, match="not a ddtd covariance store"):
        CovarianceStore(tmp_path / "y.h5")


def test_interrupted_run_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    model = load_model(_model_file(tmp_path), trust_factory="conftest")
    imgs = tmp_path / "imgs"
    write_images(imgs, 8)
    out = tmp_path / "s.h5"
    result = calibrate(model, imgs, CalibrationConfig(num_images=8, batch_size=4, show_progress=False))
    save_calibration(result, out)
    before = out.read_bytes()

    # 1. Ctrl-C during the forward pass: hooks removed, nothing written.
    calls = {"n": 0}

    def interrupt(_m, _i):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = model.conv3.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, imgs, CalibrationConfig(batch_size=4, show_progress=False))
    handle.remove()
    assert all(not m._forward_pre_hooks for m in model.modules())

    # 2. Ctrl-C while the HDF5 file is being written: the old store survives intact.
    real_write = h5py.Group.create_dataset
    written = {"n": 0}

    def write_then_interrupt(self, *a, **k):
        written["n"] += 1
        if written["n"] == 5:
            raise KeyboardInterrupt
        return real_write(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_calibration(result, out)
    assert out.read_bytes() == before
    assert _no_temp_files(tmp_path) == []
    written["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        save_calibration(result, tmp_path / "new.h5")
    assert not (tmp_path / "new.h5").exists() and _no_temp_files(tmp_path) == []


def test_nan_activations_name_the_layer(tmp_path):
    """NaN weights are named where they are held (before any forward pass); NaN inputs at the
    first layer that receives them."""
    model = tiny_net()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(NumericalError, match="parameter 'conv2.weight' holds 1 NaN"):
        calibrate(model, x, CalibrationConfig(show_progress=False))
    model = tiny_net()
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(NumericalError, match="layer 'conv1' received NaN or Inf"):
        calibrate(model, x, CalibrationConfig(show_progress=False))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_max_dim_skips_with_reason_recorded(tmp_path):
    model = _model_file(tmp_path)
    imgs = tmp_path / "imgs"
    write_images(imgs, 4)
    out = tmp_path / "s.h5"
    assert main(["calibrate", "--model", str(model), "--images", str(imgs), *SIZE, "--max-dim", "30",
                 "-o", str(out)]) == 0
    store = CovarianceStore(out)
    assert "conv2" not in store and "conv2" in store.info.skipped
    assert "input dimension 36 > max_dim 30" in store.info.skipped["conv2"]
    assert "conv1" in store and "fc" in store
    with pytest.raises(InputError, match="skipped at calibration"):
        store["conv2"]


def test_layer_patterns(tmp_path):
    model = tiny_net()
    col = MomentCollector(model, layers="conv*")
    assert col.hooked == ["conv1", "conv2", "conv3"]
    assert MomentCollector(model, layers="re:^fc$").hooked == ["fc"]
    with pytest.raises(InputError, match="matches none"):
        MomentCollector(model, layers="layer9.*")


def test_hooks_removed_on_error():
    model = tiny_net()
    with pytest.raises(RuntimeError):
        with MomentCollector(model):
            model(torch.randn(2, 5, 16, 16))  # wrong channel count
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_image_sampling_is_reproducible_and_grey_images_convert(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 12, mode="L", size=(20, 14))
    model = tiny_net(3)
    r1 = calibrate(model, imgs, CalibrationConfig(num_images=5, seed=3, batch_size=2, show_progress=False, transform=run_mod.ImageTransform(size=8, channels=3, mean=(0.5,), std=(0.25,))))
    r2 = calibrate(model, imgs, CalibrationConfig(num_images=5, seed=3, batch_size=5, show_progress=False, transform=run_mod.ImageTransform(size=8, channels=3, mean=(0.5,), std=(0.25,))))
    r3 = calibrate(model, imgs, CalibrationConfig(num_images=5, seed=4, batch_size=5, show_progress=False, transform=run_mod.ImageTransform(size=8, channels=3, mean=(0.5,), std=(0.25,))))
    assert r1.info.num_images == 5
    _assert_same_sums({"c": (r1.moments["conv1"].xxT, r1.moments["conv1"].x_sum, 1)},
                      {"c": (r2.moments["conv1"].xxT, r2.moments["conv1"].x_sum, 1)})
    assert not torch.allclose(r1.moments["conv1"].xxT, r3.moments["conv1"].xxT)
    # A grey image replicated to 3 channels: all three channel blocks of conv1's Sigma are equal.
    s = r1.moments["conv1"].xxT[0].reshape(3, 9, 3, 9)
    torch.testing.assert_close(s[0, :, 0], s[1, :, 1])
    torch.testing.assert_close(s[0, :, 0], s[2, :, 1])


def test_dataloader_and_tensor_inputs_agree():
    model = tiny_net()
    x = torch.randn(10, 3, 16, 16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(10)), batch_size=3)
    a = calibrate(model, x, CalibrationConfig(batch_size=4, show_progress=False))
    b = calibrate(model, loader, CalibrationConfig(show_progress=False))
    _assert_same_sums({n: (m.xxT, m.x_sum, m.count) for n, m in a.moments.items()},
                      {n: (m.xxT, m.x_sum, m.count) for n, m in b.moments.items()})


def test_info_command(tmp_path, capsys):
    model = _model_file(tmp_path)
    imgs = tmp_path / "imgs"
    write_images(imgs, 3)
    out = tmp_path / "s.h5"
    main(["calibrate", "--model", str(model), "--images", str(imgs), *SIZE, "-o", str(out)])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers stored: 4 of 4" in text and "conv2" in text and "groups=2" in text
