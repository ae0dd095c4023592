"""The typed configuration: validation, the flat builder the CLI uses, layer filters, the
on_layer callback and the one hook owner for captures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddtd
from ddtd.calibration import InputCapture
from ddtd.cli import build_parser
from ddtd.config import CalibrationConfig, CompressConfig, Size, config_from_options
from ddtd.errors import InputError
from ddtd.methods import (AutoConfig, CPConfig, LRSConfig, StableCPConfig, SvdConfig, Tucker2Config, default_config,
                          method_configs, with_settings)
from ddtd.selection import layer_filter


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("kw, text", [
    ({"ratio": 2, "rank": 3}, "give one size"),
    ({}, "no size given"),
    ({"ratio": 1.0}, "ratio 1.0 is out of range"),
    ({"rank": 0}, "at least 1"),
    ({"rank": (4, 0)}, "two ints >= 1"),
    ({"rank": "16"}, "rank must be"),
    ({"error": 1.5}, "error 1.5 is out of range"),
    ({"min_agreement": 1.2}, "min_agreement"),
    ({"ratio": 2, "budget": "bytes"}, "unknown budget"),
    ({"ratio": 2, "strategy": "greedy"}, "unknown rank strategy"),
    ({"ratio": 2, "allocation": "fisher"}, "unknown allocation"),
])
def test_size_refuses_bad_requests_with_a_hint(kw, text):
    with pytest.raises(InputError, match=text) as exc:
        Size(**kw)
    assert "next step" in str(exc.value)


def test_configs_validate_themselves():
    with pytest.raises(InputError, match="unknown CP layout"):
        CPConfig("cp5")
    with pytest.raises(InputError, match="max_iter must be an int >= 1"):
        Tucker2Config(max_iter=0)
    with pytest.raises(InputError, match="sparsity"):
        LRSConfig(sparsity=1.5)
    with pytest.raises(InputError, match="damping"):
        SvdConfig(damping=2.0)
    with pytest.raises(InputError, match="finish"):
        StableCPConfig("cp3", finish="rescale")
    with pytest.raises(InputError, match="rank-sized"):
        AutoConfig(candidates=(LRSConfig(),))
    with pytest.raises(InputError, match="unknown norm"):
        CompressConfig(norm="l1")
    with pytest.raises(InputError, match="holdout"):
        CalibrationConfig(holdout=1.0)
    assert CompressConfig(sequential=True).sequential == "on" and CompressConfig(sequential=False).sequential == "off"
    assert StableCPConfig("cp4").name == "cp4-stable" and CPConfig("cp3").name == "cp3"


def test_tucker2_int_rank_means_both_ranks():
    """tensorly's convention: an int rank R for Tucker2 is (R, R)."""
    from ddtd.ranks import LayerShape, resolve_rank

    shape = LayerShape(T=32, S=16, kh=3, kw=3, groups=1, pos_in=64, pos_out=64)
    assert resolve_rank(8, "tucker2", shape) == (8, 8)
    assert resolve_rank((8, 4), "tucker2", shape) == (8, 4)
    args = build_parser().parse_args(["compress", "--model", "resnet18", "--calib", "s.h5", "--rank", "16,8",
                                      "-o", "x.ddtd"])
    assert args.rank == (16, 8)


def test_mean_and_std_take_spaces_or_commas():
    p = build_parser()
    base = ["calibrate", "--model", "resnet18", "--images", "d", "-o", "s.h5"]
    spaced = p.parse_args(base + ["--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.2"])
    commas = p.parse_args(base + ["--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2"])
    from ddtd.cli import _joined

    assert _joined(spaced.mean) == _joined(commas.mean) == (0.5, 0.4, 0.3)
    assert _joined(spaced.std) == _joined(commas.std) == (0.2, 0.2, 0.2)


def test_flat_options_build_the_same_tree():
    cfg = config_from_options(ratio=4, method="tucker2", max_iter=7, solver_seed=3, seed=5, sequential=False)
    assert cfg == CompressConfig(method=Tucker2Config(max_iter=7, seed=3), size=Size(ratio=4),
                                 calibration=CalibrationConfig(seed=5), sequential="off")
    auto = config_from_options(ratio=2, max_iter=9, stabilize=False, sparsity=0.25)
    assert isinstance(auto.method, AutoConfig) and not auto.method.stabilize
    assert all(getattr(c, "max_iter", 9) == 9 for c in auto.method.candidates) and auto.method.lrs.sparsity == 0.25
    assert config_from_options().size == Size(ratio=2.0)
    with pytest.raises(InputError, match="unknown option"):
        config_from_options(ratio=2, layers="fc")
    configs = method_configs(with_settings(default_config("auto"), max_iter=4))
    assert {"svd", "tucker2", "cp3", "cp4", "cp3-stable", "cp4-stable", "lrs"} <= set(configs)
    assert configs["cp3-stable"].max_iter == 4


def test_default_filter_leaves_the_first_and_last_layers_dense():
    net = _net()
    f = layer_filter(net)
    assert [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and f(n, m)] == ["2", "4"]
    assert "input layer" in f.reason("0") and "classifier" in f.reason("8")
    assert layer_filter(net, include_first=True, include_last=True)("0", net[0])
    assert layer_filter(net, "0,4")("0", net[0]) and not layer_filter(net, "0,4")("2", net[2])


def test_filter_fn_and_on_layer(single_thread):
    """A plain callable picks the layers; on_layer sees every report row as it is fitted."""
    net, x = _net(), torch.randn(24, 3, 8, 8)
    seen = []
    res = ddtd.compress(net, x, CompressConfig(method=SvdConfig(), size=Size(rank=2), sequential="off"),
                        filter_fn=lambda name, m: name == "4", on_layer=seen.append)
    rows = {r.name: r for r in res.report.layers}
    assert rows["4"].method == "svd" and rows["2"].method == "dense" and rows["2"].note == "left out by filter_fn"
    assert [r.name for r in seen] == ["0", "2", "4", "8"]  # every planned layer, in module order
    assert seen[2] is rows["4"]


def test_input_capture_stops_after_the_layer():
    """The one hook owner captures a layer's inputs and does not run the rest of the model."""
    net = _net()
    calls = []
    net[8].register_forward_pre_hook(lambda m, i: calls.append(1))
    x = torch.randn(4, 3, 8, 8)
    got = InputCapture(net, ["2"]).run([x[:2], x[2:]], "cpu")["2"]
    assert not calls and len(got) == 2
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(got), net[1](net[0](x)))
    assert not net[2]._forward_pre_hooks  # removed again


def test_flat_keywords_still_work_with_a_deprecation_warning(single_thread):
    net, x = _net(), torch.randn(24, 3, 8, 8)
    new = ddtd.compress(net, x, config_from_options(rank=2, method="svd", sequential=False),
                        filter_fn=layer_filter(net, include_first=True))
    with pytest.warns(DeprecationWarning, match="config_from_options"):
        old = ddtd.compress(net, x, rank=2, method="svd", sequential=False, include_first=True)
    assert [(r.name, r.method, r.ranks) for r in old.report.layers] == [(r.name, r.method, r.ranks)
                                                                        for r in new.report.layers]
    with torch.no_grad():
        torch.testing.assert_close(old.model(x), new.model(x))
    with pytest.raises(InputError, match="not both"):
        ddtd.compress(net, x, CompressConfig(), ratio=2)


def _layer_count(model):
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def _one_chain_per_layer(result, original) -> bool:
    """Each compressed layer is one svd chain (two layers), nothing nested: the count of Conv2d /
    Linear modules is the original's plus one per svd row."""
    return _layer_count(result.model) == _layer_count(original) + sum(r.method == "svd" for r in result.report.layers)


def test_stages_and_compressing_a_compressed_file_keep_the_layer_count(tmp_path, single_thread):
    """--stages N and a second compression of a .ddtd file re-fit the chains (merged back into
    dense layers first): same number of layers as one compression, the ratio within 2%."""
    from conftest import plain_cnn

    net = plain_cnn()
    net.ddtd_spec = {"source": "factory", "name": "conftest:plain_cnn", "kwargs": {}}
    x = torch.randn(64, 3, 16, 16)
    one = ddtd.compress(net, x, config_from_options(ratio=2.5, method="svd", sequential=False))
    three = ddtd.compress(net, x, config_from_options(ratio=2.5, method="svd", sequential=False, stages=3))
    assert _one_chain_per_layer(one, net) and _one_chain_per_layer(three, net)
    assert three.report.ratio == pytest.approx(2.5, rel=0.02)
    assert [round(s["ratio"], 3) for s in three.report.settings["stages"]] == [1.357, 1.842, 2.5]
    path = tmp_path / "a.ddtd"
    half = ddtd.compress(net, x, config_from_options(ratio=1.5, method="svd", sequential=False))
    ddtd.save_model(half.model, path, spec=net.ddtd_spec, replacements=half.records)
    again = ddtd.compress(ddtd.load(path, trust_factory="conftest"), x,
                          config_from_options(ratio=2.5, method="svd", sequential=False))
    assert _one_chain_per_layer(again, net) and len(again.records) > len(half.records)
    assert again.report.ratio == pytest.approx(2.5, rel=0.02)
    out = tmp_path / "b.ddtd"
    ddtd.save_model(again.model, out, spec=net.ddtd_spec, replacements=again.records)
    with torch.no_grad():
        torch.testing.assert_close(ddtd.load(out, trust_factory="conftest")(x[:4]), again.model(x[:4]),
                                   rtol=0, atol=1e-5)
