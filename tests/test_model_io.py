"""Loading models: torchvision names + weights, factories, ddtd files, TorchScript; never unpickling code."""

import pytest
import torch

from ddtd.config import CalibrationConfig

from conftest import tiny_net
from ddtd.calibration import calibrate
from ddtd.errors import InputError
from ddtd.model_io import load_model, load_state_dict_file, save_model


def test_torchvision_name_with_local_weights(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.pt")  # nested checkpoint dict
    model = load_model("resnet18", weights=tmp_path / "w.pt", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert not model.training


def test_wrong_num_classes_is_explained(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError, match="do not fit the architecture"):
        load_model("resnet18", weights=tmp_path / "w.pt")


def test_factory_and_ddtd_file_roundtrip(tmp_path):
    model = load_model("ddtd.zoo:vgg_fmnist")
    path = tmp_path / "m.ddtd"
    save_model(model, path)
    again = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_torchscript_loads_but_is_not_calibrated(tmp_path):
    model = tiny_net().eval()
    scripted = torch.jit.script(model)
    scripted.save(str(tmp_path / "m.ts"))
    loaded = load_model(tmp_path / "m.ts")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(InputError, match="TorchScript model cannot be calibrated"):
        calibrate(loaded, x, CalibrationConfig(show_progress=False))


def test_pickled_module_is_never_unpickled(tmp_path):
    """A checkpoint holding a pickled nn.Module (arbitrary code) is refused, not executed."""
    torch.save(tiny_net(), tmp_path / "evil.pt")
    with pytest.raises(InputError, match="safely"):
        load_model(tmp_path / "evil.pt")
    with pytest.raises(InputError, match="safely"):
        load_state_dict_file(tmp_path / "evil.pt")


def test_unknown_names_and_missing_files():
    with pytest.raises(InputError, match="unknown torchvision architecture"):
        load_model("resnet9000")
    with pytest.raises(InputError, match="cannot import factory"):
        load_model("nosuchpkg.mod:make")
    with pytest.raises(InputError, match="not found"):
        load_model("missing/model.ddtd")
