"""Layer builders, module surgery, BatchNorm folding and replacement records (ddtd.layers)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddtd.errors import InputError
from ddtd.layers import (apply_replacements, build_cp3, build_cp4, build_dense, build_svd,
                         build_tucker2, count_macs, count_params, describe_fold,
                         describe_replacement, dense_forward, factor_shapes, factorized_weight,
                         find_conv_bn_pairs, fold_batchnorm, fold_records, get_module,
                         macs_by_layer, replace_layer, set_module)

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
              pytest.mark.usefixtures("single_thread")]


BUILD = {"svd": build_svd, "tucker2": build_tucker2, "cp3": build_cp3, "cp4": build_cp4}
RANKS = {"svd": 3, "tucker2": (3, 2), "cp3": 4, "cp4": 4}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def random_factors(kind, layer, ranks, dtype=None, stacked=False):
    """Random factors of the right shapes; list per group (or stacked) for grouped layers."""
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    dt = dtype or layer.weight.dtype
    shapes = factor_shapes(kind, layer, ranks)
    if g == 1:
        return [torch.randn(s, dtype=dt) for s in shapes]
    if stacked:
        return [torch.randn((g, *s), dtype=dt) for s in shapes]
    return [[torch.randn(s, dtype=dt) for _ in range(g)] for s in shapes]


def geometry_grid():
    """Conv geometries: the full product kernel x stride x padding (ints, tuples, 'same' incl.
    the asymmetric split of even kernels, 'valid') x dilation x groups x padding mode, bias on /
    off cycling; then even 'same' kernels with dilation and a few larger / odd shapes."""
    modes = ["zeros", "reflect", "circular", "replicate"]
    cases = []
    for i, (k, stride, pad, dil, g, mode) in enumerate(itertools.product(
            [(3, 3), (2, 3)], [1, 2, (2, 1)], [0, 1, (2, 1), "same", "valid"], [1, (1, 2)],
            [1, 2], modes)):
        if pad == "same" and stride != 1:
            continue   # PyTorch refuses 'same' with stride > 1
        cases.append(dict(in_channels=6, out_channels=4, kernel_size=k, stride=stride,
                          padding=pad, dilation=dil, groups=g, padding_mode=mode,
                          bias=i % 3 != 0))
    for mode in modes:
        for k, dil, g in [((2, 3), 1, 1), ((2, 4), (1, 2), 2), ((4, 4), (2, 1), 1)]:
            cases.append(dict(in_channels=6, out_channels=4, kernel_size=k, stride=1,
                              padding="same", dilation=dil, groups=g, padding_mode=mode,
                              bias=True))
    cases += [
        dict(in_channels=6, out_channels=9, kernel_size=5, stride=(1, 2), padding=2, dilation=1,
             groups=3, padding_mode="reflect", bias=True),
        dict(in_channels=6, out_channels=6, kernel_size=1, stride=2, padding=0, dilation=1,
             groups=3, padding_mode="zeros", bias=True),
        dict(in_channels=6, out_channels=3, kernel_size=3, stride=3, padding=(0, 1), dilation=2,
             groups=3, padding_mode="replicate", bias=True),
    ]
    return cases


GRID = geometry_grid()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["svd", "tucker2", "cp3", "cp4"])
def test_chain_matches_factorized_weight(kind, dtype):
    """chain(x) == F.conv2d(x, K~, bias, original geometry) over the geometry grid."""
    assert len(GRID) > 300
    x = torch.randn(2, 6, 9, 10, dtype=dtype)
    worst = 0.0
    for i, geo in enumerate(GRID):
        layer = nn.Conv2d(**geo, dtype=dtype)
        xi = x[:, :geo["in_channels"]]
        factors = random_factors(kind, layer, RANKS[kind], stacked=i % 2 == 0)
        new_bias = torch.randn(geo["out_channels"], dtype=dtype) if i % 4 == 1 else None
        chain = BUILD[kind](layer, *factors, bias=new_bias)
        assert isinstance(chain, nn.Sequential)
        assert all(type(m) is nn.Conv2d for m in chain)
        assert all(p.dtype == dtype for p in chain.parameters())
        w = factorized_weight(layer, kind, *factors)
        assert w.shape == layer.weight.shape
        ref_bias = new_bias if new_bias is not None else layer.bias
        ref = dense_forward(layer, xi, w, ref_bias)
        # the reference itself is plain F.conv2d on the padded input
        if layer.padding_mode == "zeros":
            assert torch.equal(ref, F.conv2d(xi, w, ref_bias, layer.stride, layer.padding,
                                             layer.dilation, layer.groups))
        with torch.no_grad():
            y = chain(xi)
        assert y.shape == ref.shape, geo
        err = rel_err(y, ref)
        assert err <= TOL[dtype], (geo, err)
        worst = max(worst, err)
        # only the last layer carries the bias
        assert all(m.bias is None for m in chain[:-1])
        assert (chain[-1].bias is None) == (ref_bias is None)
    assert worst > 0 or dtype == torch.float64


def test_chain_parameter_counts_and_geometry():
    layer = nn.Conv2d(8, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=2,
                      padding_mode="reflect")
    T, Sg, Tg, g, kh, kw = 6, 4, 3, 2, 3, 3
    svd = build_svd(layer, *random_factors("svd", layer, 2))
    assert count_params(svd) == g * 2 * (Sg * kh * kw + Tg) + T
    first = svd[0]
    assert (first.kernel_size, first.stride, first.padding, first.dilation, first.groups,
            first.padding_mode) == ((3, 3), (2, 2), (1, 2), (1, 2), 2, "reflect")
    tk = build_tucker2(layer, *random_factors("tucker2", layer, (3, 2)))
    assert count_params(tk) == g * (Sg * 2 + 3 * 2 * kh * kw + 3 * Tg) + T
    assert tk[1].stride == (2, 2) and tk[0].stride == (1, 1) and tk[2].kernel_size == (1, 1)
    cp3 = build_cp3(layer, *random_factors("cp3", layer, 5))
    assert count_params(cp3) == g * 5 * (Sg + kh * kw + Tg) + T
    assert cp3[1].groups == g * 5
    cp4 = build_cp4(layer, *random_factors("cp4", layer, 5))
    assert count_params(cp4) == g * 5 * (Sg + kh + kw + Tg) + T
    assert (cp4[1].kernel_size, cp4[1].stride, cp4[1].padding, cp4[1].dilation) == \
        ((3, 1), (2, 1), (1, 0), (1, 1))
    assert (cp4[2].kernel_size, cp4[2].stride, cp4[2].padding, cp4[2].dilation) == \
        ((1, 3), (1, 2), (0, 2), (1, 2))
    assert cp4[1].padding_mode == cp4[2].padding_mode == "reflect"
    # the chain is independent of the factor tensors it was built from
    A, B = [torch.randn(6, 2)], [torch.randn(2, 72)]
    lin = nn.Linear(72, 6)
    chain = build_svd(lin, A[0], B[0])
    A[0].zero_()
    assert chain[1].weight.abs().sum() > 0


def test_linear_svd_2d_and_3d_inputs():
    for dtype in (torch.float32, torch.float64):
        lin = nn.Linear(20, 7, dtype=dtype)
        A, B = torch.randn(7, 3, dtype=dtype), torch.randn(3, 20, dtype=dtype)
        b = torch.randn(7, dtype=dtype)
        chain = build_svd(lin, A, B, bias=b)
        assert [type(m) for m in chain] == [nn.Linear, nn.Linear]
        assert chain[0].bias is None and count_params(chain) == 3 * (20 + 7) + 7
        w = factorized_weight(lin, "svd", A, B)
        for shape in [(5, 20), (2, 4, 20)]:
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                assert rel_err(chain(x), dense_forward(lin, x, w, b)) <= TOL[dtype]
                assert rel_err(chain(x), x @ (A @ B).T + b) <= TOL[dtype]
    no_bias = nn.Linear(20, 7, bias=False)
    assert build_svd(no_bias, A.float(), B.float())[1].bias is None
    for kind in ("tucker2", "cp3", "cp4"):
        with pytest.raises(InputError, match="Linear") as exc:
            factor_shapes(kind, no_bias, 2, name="fc")
        assert "'fc'" in str(exc.value) and "svd" in exc.value.hint


def test_depthwise_svd_and_dense_and_refusals():
    dw = nn.Conv2d(5, 5, 3, stride=2, padding=1, groups=5, padding_mode="circular",
                   dtype=torch.float64)
    x = torch.randn(2, 5, 8, 7, dtype=torch.float64)
    A, B = torch.randn(5, 1, 1, dtype=torch.float64), torch.randn(5, 1, 9, dtype=torch.float64)
    chain = build_svd(dw, A, B)
    w = factorized_weight(dw, "svd", A, B)
    with torch.no_grad():
        assert rel_err(chain(x), dense_forward(dw, x, w)) <= 1e-12
    # rank 1 per group represents the depthwise kernel exactly
    A1 = torch.ones(5, 1, 1, dtype=torch.float64)
    B1 = dw.weight.detach().reshape(5, 1, 9)
    with torch.no_grad():
        assert rel_err(build_svd(dw, A1, B1)(x), dw(x)) <= 1e-12
    # "leave dense", with a corrected bias
    b = torch.randn(5, dtype=torch.float64)
    dense = build_dense(dw, bias=b)
    assert type(dense) is nn.Conv2d and dense.padding_mode == "circular"
    with torch.no_grad():
        assert torch.allclose(dense(x), dense_forward(dw, x, None, b), rtol=0, atol=1e-12)
    for kind, builder in (("tucker2", build_tucker2), ("cp3", build_cp3), ("cp4", build_cp4)):
        with pytest.raises(InputError, match="one input channel per group") as exc:
            builder(dw, *[torch.zeros(1)] * (4 if kind == "cp4" else 3), name="blk.dw")
        assert "blk.dw" in str(exc.value) and "svd" in exc.value.hint


def test_builder_input_errors_name_the_layer():
    conv = nn.Conv2d(6, 4, 3, groups=2)
    A, B = random_factors("svd", conv, 2, stacked=True)
    with pytest.raises(InputError, match=r"layer 'm\.c'.*factor B.*expected \(2, 27\)"):
        build_svd(conv, A, B[:, :, :-1], name="m.c")
    with pytest.raises(InputError, match="3 groups, the layer has 2"):
        build_svd(conv, list(A) + [A[0]], list(B) + [B[0]])
    with pytest.raises(InputError, match="expected"):   # ranks differ between groups
        build_svd(conv, [A[0], torch.randn(2, 3)], [B[0], torch.randn(3, 27)])
    bad = B.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        build_svd(conv, A, bad)
    with pytest.raises(InputError, match=r"bias has shape \(3,\), expected \(4,\)"):
        build_svd(conv, A, B, bias=torch.zeros(3))
    with pytest.raises(InputError, match="Conv1d"):
        build_svd(nn.Conv1d(6, 4, 3), torch.zeros(4, 2), torch.zeros(2, 18))
    with pytest.raises(InputError, match="ranks must be >= 1"):
        factor_shapes("tucker2", conv, (0, 2))
    with pytest.raises(InputError, match="unknown format"):
        factor_shapes("ht", conv, 2)
    with pytest.raises(InputError, match="expected 2 dims"):
        build_svd(nn.Conv2d(6, 4, 3), torch.zeros(2, 4, 2), torch.zeros(2, 2, 54))


def test_builders_accept_solver_output():
    """Factors exactly as ddtd.solvers returns them (grouped: stacked) build an exact chain."""
    from ddtd.solvers import cp3, cp4, sigma_svd, tucker2

    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2, dtype=torch.float64)
    Wt = conv.weight.detach()
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    opts = dict(groups=2, dtype=torch.float64)
    res = {
        "svd": sigma_svd(Wt, None, 3, **opts),
        "tucker2": tucker2(Wt, None, (2, 3), max_iter=3, **opts),
        "cp3": cp3(Wt, None, 3, max_iter=3, **opts),
        "cp4": cp4(Wt, None, 3, max_iter=3, **opts),
    }
    for kind, r in res.items():
        if kind == "svd":
            factors, kernel = (r.A, r.B), r.matrix().reshape(Wt.shape)
        elif kind == "tucker2":
            factors, kernel = (r.U, r.core, r.V), r.kernel().reshape(Wt.shape)
        else:
            factors = (r.A, r.B, r.C) + ((r.E,) if kind == "cp4" else ())
            kernel = r.kernel().reshape(Wt.shape)
        assert torch.allclose(factorized_weight(conv, kind, *factors), kernel, atol=1e-12)
        with torch.no_grad():
            assert rel_err(BUILD[kind](conv, *factors)(x), dense_forward(conv, x, kernel)) <= 1e-10


# ------------------------------------------------------------------------------------------
# surgery
# ------------------------------------------------------------------------------------------

class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                                      nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
        self.heads = nn.ModuleDict({"cls": nn.Linear(4, 2)})
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 1)])


def test_get_set_module_nested_names():
    m = Nested()
    assert get_module(m, "") is m
    assert get_module(m, "features.2.0") is m.features[2][0]
    new = nn.Conv2d(4, 4, 1)
    old = set_module(m, "features.2.0", new)
    assert m.features[2][0] is new and isinstance(old, nn.Conv2d) and old is not new
    set_module(m, "heads.cls", nn.Identity())
    assert isinstance(m.heads["cls"], nn.Identity)
    set_module(m, "blocks.0", nn.Sequential())
    assert isinstance(m.blocks[0], nn.Sequential)
    assert dict(m.named_modules())["features.2.0"] is new
    with pytest.raises(InputError, match="no sub-module '5'") as exc:
        set_module(m, "features.5", nn.Identity())
    assert "features.0" in exc.value.hint or "features.2" in exc.value.hint
    with pytest.raises(InputError, match="no module named 'featurs.0'") as exc:
        get_module(m, "featurs.0")
    assert "did you mean" in exc.value.hint
    with pytest.raises(InputError, match="root"):
        set_module(m, "", nn.Identity())
    with pytest.raises(InputError, match="not|cannot put"):
        set_module(m, "features.0", torch.zeros(1))
    with pytest.raises(InputError):
        get_module(m, "features.1.weight")   # ReLU has no children


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


def test_fold_batchnorm_resnet18():
    import torchvision

    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    folded_model, folded = fold_batchnorm(model)
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert len(folded) == 20
    assert folded["conv1"] == "bn1" and folded["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_model.modules())
    assert all(get_module(folded_model, c).bias is not None for c in folded)
    with torch.no_grad():
        out = folded_model.eval()(x)
    assert rel_err(out, ref) <= 1e-5
    # the structural fallback finds the same pairs
    assert sorted(find_conv_bn_pairs(model, trace=False)) == sorted(folded.items())
    m2, f2 = fold_batchnorm(model, trace=False)
    assert f2.keys() == folded.keys()
    with torch.no_grad():
        assert rel_err(m2(x), ref) <= 1e-5


def vgg_style():
    layers, c = [], 3
    for v in [8, "M", 16, 16, "M", 32]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=v != 16), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 5))


def test_fold_batchnorm_vgg_sequential():
    model = randomize_bn(vgg_style(), seed=1)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    for trace in (True, False):
        folded_model, folded = fold_batchnorm(model, trace=trace)
        assert folded == {"0.0": "0.1", "0.4": "0.5", "0.7": "0.8", "0.11": "0.12"}
        with torch.no_grad():
            assert rel_err(folded_model(x), ref) <= 1e-5
    # inplace=True modifies and returns the same object
    same, _ = fold_batchnorm(model, inplace=True)
    assert same is model and isinstance(model[0][1], nn.Identity)


class SharedOutput(nn.Module):
    """conv_a's output feeds its BN and a skip path: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv_a(x)
        return self.bn_b(self.conv_b(self.bn_a(y))) + y


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if x.sum() > 0:
            x = -x
        return self.bn2(self.conv2(x))


def test_fold_batchnorm_trace_rules_and_fallback():
    x = torch.randn(2, 3, 10, 10)
    m = randomize_bn(SharedOutput())
    with torch.no_grad():
        ref = m(x)
    fm, folded = fold_batchnorm(m)
    assert folded == {"conv_b": "bn_b"}          # conv_a has a second user: not folded
    assert isinstance(fm.bn_a, nn.BatchNorm2d)
    with torch.no_grad():
        assert rel_err(fm(x), ref) <= 1e-5
    u = randomize_bn(Untraceable())
    with torch.no_grad():
        ref = u(x)
    fu, folded = fold_batchnorm(u)
    assert folded == {"conv1": "bn1", "conv2": "bn2"}
    assert fu.conv2.bias is not None
    with torch.no_grad():
        assert rel_err(fu(x), ref) <= 1e-5


def test_count_macs_formula():
    conv = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    N, H, W = 2, 11, 13
    Ho = (H + 2 * 1 - 1 * (3 - 1) - 1) // 2 + 1
    Wo = (W + 2 * 2 - 2 * (5 - 1) - 1) // 1 + 1
    assert count_macs(conv, (N, 6, H, W)) == N * 8 * Ho * Wo * (6 // 2) * 3 * 5
    lin = nn.Linear(12, 7)
    assert count_macs(lin, (4, 5, 12)) == 4 * 5 * 7 * 12
    # a model: train flags and BN statistics untouched; per-layer dict
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).train()
    stats = model[1].running_mean.clone()
    per = macs_by_layer(model, (1, 3, 6, 6))
    assert per == {"0": 4 * 6 * 6 * 3 * 9, "3": 5 * 144}
    assert model.training and model[1].training and torch.equal(model[1].running_mean, stats)
    # a factorised chain costs what its layers cost
    big = nn.Conv2d(16, 16, 3, padding=1)
    chain = build_cp3(big, *random_factors("cp3", big, 4))
    assert count_macs(chain, (1, 16, 8, 8)) == 64 * (4 * 16 + 4 * 9 + 16 * 4)


# ------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.g = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.c4 = nn.Conv2d(8, 6, (2, 3), padding="same", padding_mode="circular")
        self.c5 = nn.Conv2d(6, 6, 1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.g(x))
        x = self.dw(x)
        x = torch.relu(self.c4(x))
        x = self.c5(x)
        return self.fc(x.mean((2, 3)))


def test_records_rebuild_from_state_dict(tmp_path):
    torch.manual_seed(3)
    model = randomize_bn(Small())
    model, folded = fold_batchnorm(model)
    records = fold_records(folded)
    plan = [("stem.0", "tucker2", (4, 2)), ("g", "svd", 3), ("dw", "svd", 1), ("c4", "cp4", 5),
            ("c5", "dense", None), ("fc", "svd", 2)]
    for name, kind, ranks in plan:
        layer = get_module(model, name)
        T = layer.weight.shape[0]
        factors = [] if kind == "dense" else random_factors(kind, layer, ranks, stacked=True)
        rec = replace_layer(model, name, kind, factors, bias=torch.randn(T))
        assert rec == describe_replacement(name, kind, layer, ranks, bias=True)
        records.append(rec)
    records.append(describe_replacement("g.0", "cp3", get_module(model, "g.0"), 2))
    replace_layer(model, "g.0", "cp3", random_factors("cp3", get_module(model, "g.0"), 2))
    assert isinstance(model.c5, nn.Conv2d) and model.c5.bias is not None
    assert records[0] == {"kind": "fold_bn", "conv": "stem.0", "bn": "stem.1"}
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model.eval()(x)
    path = tmp_path / "m.pt"
    torch.save({"records": records, "state_dict": model.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    assert blob["records"] == records
    fresh = Small()
    rebuilt = apply_replacements(fresh, blob["records"])
    assert isinstance(fresh.stem[1], nn.BatchNorm2d)       # not modified in place
    rebuilt.load_state_dict(blob["state_dict"], strict=True)
    with torch.no_grad():
        out = rebuilt.eval()(x)
    assert torch.equal(out, ref)
    assert str(rebuilt) == str(model)


def test_apply_replacements_errors():
    model = Small()
    rec = describe_replacement("g", "svd", model.g, 3)
    with pytest.raises(InputError, match="different architecture"):
        apply_replacements(Nested(), [describe_replacement("features.0", "svd",
                                                           nn.Conv2d(3, 4, 5), 2)])
    with pytest.raises(InputError, match="no module named 'nope'"):
        apply_replacements(model, [dict(rec, name="nope")])
    with pytest.raises(InputError, match="malformed"):
        apply_replacements(model, [{"kind": "svd", "name": "g"}])
    with pytest.raises(InputError, match="not a Conv2d / Linear"):
        apply_replacements(model, [rec, rec])                # replaced twice
    with pytest.raises(InputError, match="not a BatchNorm2d"):
        apply_replacements(model, [describe_fold("stem.0", "stem.2")])
    with pytest.raises(InputError, match="list of dicts"):
        apply_replacements(model, rec)
    with pytest.raises(InputError, match="one input channel per group"):
        describe_replacement("dw", "cp3", model.dw, 2)
    with pytest.raises(InputError, match="keeps one"):
        describe_replacement("g", "svd", model.g, 3, bias=False)
