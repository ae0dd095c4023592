"""Tensor-train formats: planted recovery in the Sigma norm, chains equal to their dense weight,
Sigma against Frobenius on held-out outputs, monotone histories, sizing and saved models."""

import io

import pytest
import torch
from torch import nn

from conftest import write_images
from ddtd.cli import main
from ddtd.errors import InputError
from ddtd.layers import (TTMatrix, apply_replacements, build, count_params, factorized_weight, macs_by_layer,
                         replace_layer)
from ddtd.methods import TTConfig, applicable
from ddtd.model_io import load_model, save_model
from ddtd.ranks import LayerShape, Ratio, format_macs, resolve_rank
from ddtd.solvers import tt_conv, tt_full, tt_matrix, tt_matrix_svd
from ddtd.solvers.formats import (balanced_factors, param_count, rank_for_ratio, tt_matrix_macs, tt_matrix_modes,
                                  tt_max_ranks)
from synthetic import activation_patches

F64 = torch.float64


def _aniso_sigma(D, seed=0, n=3000, decades=3.0):
    """A covariance with eigenvalues over ``decades`` decades in a random basis."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=F64) * torch.logspace(0, -decades / 2, D, dtype=F64)
    X = X @ torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))[0]
    return X.T @ X / n


def _rel_sigma_error(W, Wt, S):
    E = (W - Wt).to(F64).reshape(W.shape[0], -1)
    W = W.to(F64).reshape(W.shape[0], -1)
    return float(torch.trace(E @ S @ E.T) / torch.trace(W @ S @ W.T))


def test_planted_tt_conv_is_recovered_in_sigma():
    g = torch.Generator().manual_seed(3)
    C, Y, X, T = (torch.randn(8, 3, generator=g), torch.randn(3, 3, 4, generator=g),
                  torch.randn(4, 3, 5, generator=g), torch.randn(5, 12, generator=g))
    K = torch.einsum("sa,ayb,bxc,ct->tsyx", C, Y, X, T)
    S = _aniso_sigma(8 * 9)
    r = tt_conv(K, S, (3, 4, 5), damping=0.0)
    assert r.rel_error < 1e-6
    assert _rel_sigma_error(K, r.kernel(), S) < 1e-6
    assert r.ranks == (3, 4, 5)


def test_planted_tt_matrix_is_recovered_in_sigma():
    g = torch.Generator().manual_seed(4)
    cores = [torch.randn(1, 4, 2, 3, generator=g), torch.randn(3, 3, 4, 2, generator=g),
             torch.randn(2, 2, 3, 1, generator=g)]
    W = tt_full(cores)                                       # (24, 24)
    S = _aniso_sigma(24)
    r = tt_matrix(W, S, (3, 2), out_modes=(4, 3, 2), in_modes=(2, 4, 3), damping=0.0)
    assert r.rel_error < 1e-6
    assert _rel_sigma_error(W, r.matrix(), S) < 1e-6


@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, padding=1), dict(stride=(2, 1), padding=(1, 2),
                                                                                    dilation=(1, 2)),
                                      dict(padding="same", padding_mode="reflect"), dict(padding=1, groups=2)])
def test_tt_conv_chain_equals_its_dense_kernel(geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **geometry)
    g = conv.groups
    r = tt_conv(conv.weight.detach(), None, (3, 4, 5), groups=g, max_iter=2)
    factors = [r.C, r.Y, r.X, r.T]
    chain = build("tt", conv, factors)
    assert all(isinstance(m, (nn.Sequential, nn.Conv2d)) for m in chain.modules())
    W = factorized_weight(conv, "tt", *factors)
    torch.testing.assert_close(W, r.kernel().reshape(W.shape), rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 8, 11, 13)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), conv._conv_forward(x, W, conv.bias), rtol=1e-5, atol=1e-5)
    assert count_params(chain) - 12 == g * param_count("tt", 12 // g, 8 // g, 3, 3, (3, 4, 5))


@pytest.mark.parametrize("layer", [nn.Linear(24, 20), nn.Conv2d(24, 20, 1, stride=2)])
def test_tt_matrix_module_equals_its_dense_weight_and_counts_honestly(layer):
    torch.manual_seed(0)
    r = tt_matrix(layer.weight.detach(), None, (3, 4), max_iter=2)
    m = build("tt", layer, r.cores)
    assert isinstance(m, TTMatrix)
    W = factorized_weight(layer, "tt", *r.cores)
    torch.testing.assert_close(W.reshape(20, 24), r.matrix(), rtol=1e-5, atol=1e-6)
    if isinstance(layer, nn.Linear):
        x = torch.randn(5, 3, 24)
        ref = nn.functional.linear(x, W, layer.bias)
        shape = (1, 24)
    else:
        x = torch.randn(2, 24, 9, 9)
        ref = layer._conv_forward(x, W, layer.bias)
        shape = (1, 24, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert count_params(m) - 20 == param_count("tt", 20, 24, 1, 1, r.ranks)
    modes = tt_matrix_modes(20, 24)
    assert (r.out_modes, r.in_modes) == modes
    assert sum(macs_by_layer(m, shape).values()) == tt_matrix_macs(*modes, r.ranks)
    traced = torch.jit.trace(m.eval(), x)
    torch.testing.assert_close(traced(x), m(x))


def _held_out(W, X_fit, X_test, fit):
    """Relative held-out output error of the fit in Sigma and in Frobenius."""
    S = X_fit.T @ X_fit / len(X_fit)
    errs = []
    for sigma in (S, None):
        Wt = fit(W, sigma).to(F64).reshape(W.shape[0], -1)
        Y, Yt = X_test @ W.to(F64).reshape(W.shape[0], -1).T, X_test @ Wt.T
        errs.append(float((Y - Yt).norm() / Y.norm()))
    return errs


def test_sigma_beats_frobenius_on_held_out_outputs():
    from synthetic import structured_kernel

    K = structured_kernel(16, 8, 3, seed=0)
    P = activation_patches(8, 3, 48, 10, seed=1).to(F64)
    sig, fro = _held_out(K, P[: len(P) // 2], P[len(P) // 2:],
                         lambda W, s: tt_conv(W, s, (4, 6, 6), max_iter=8).kernel())
    assert sig < 0.7 * fro, (sig, fro)
    W = torch.randn(24, 32, dtype=torch.float32)
    X = P[:, :32]
    sig, fro = _held_out(W, X[: len(X) // 2], X[len(X) // 2:],
                         lambda W, s: tt_matrix(W, s, 4, max_iter=8).matrix())
    assert sig < 0.7 * fro, (sig, fro)


def test_error_histories_never_increase():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        K = torch.randn(10, 6, 3, 3, generator=g)
        S = _aniso_sigma(54, seed=seed, n=400)
        for res in (tt_conv(K, S, (3, 4, 4), max_iter=6), tt_matrix(K[:, :, 0, 0].T.reshape(6, 10).repeat(2, 1),
                                                                     S[:10, :10], 3, max_iter=6)):
            h = res.history
            assert all(b <= a for a, b in zip(h, h[1:])), h
            assert res.rel_error == h[-1] and min(res.raw_history) == h[-1]


def test_tt_svd_matches_tensorly_at_equal_ranks():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 48, generator=g, dtype=F64)
    om, im = (4, 4, 4), (4, 4, 3)
    ours = tt_full(tt_matrix_svd(W, om, im, (5, 5)))
    X = W.reshape(*om, *im).numpy()
    theirs = tl.tt_matrix_to_tensor(tensor_train_matrix(X, [1, 5, 5, 1]))
    theirs = torch.from_numpy(theirs.reshape(64, 48))
    e_ours, e_theirs = float((W - ours).norm()), float((W - theirs).norm())
    assert e_ours <= e_theirs * (1 + 1e-9)


def test_modes_ranks_and_sizing():
    assert balanced_factors(512, 3) == (8, 8, 8)
    assert balanced_factors(10, 3) == (5, 2, 1)
    assert tt_max_ranks((4, 3, 2), (2, 4, 3)) == (8, 6)
    for T, S, k, ratio in ((64, 32, 3, 4.0), (128, 64, 1, 3.0), (100, 30, 1, 2.0)):
        ranks = rank_for_ratio("tt", T, S, k, k, ratio)
        assert param_count("tt", T, S, k, k, ranks) <= T * S * k * k / ratio
        bigger = tuple(r + 1 for r in ranks)
        assert param_count("tt", T, S, k, k, bigger) > T * S * k * k / ratio or bigger != tuple(
            min(a, b) for a, b in zip(bigger, tt_max_ranks(*tt_matrix_modes(T, S)) if k == 1 else bigger))
    shape = LayerShape(T=64, S=32, kh=3, kw=3, pos_in=64, pos_out=64)
    r = resolve_rank(Ratio(4.0), "tt", shape)
    assert len(r) == 3 and format_macs("tt", shape, r) < shape.dense_macs
    with pytest.raises(InputError):
        TTConfig(cores=1)
    with pytest.raises(InputError):
        TTConfig(out_modes=(4, 4))
    dw = nn.Conv2d(8, 8, 3, groups=8)
    assert not applicable("tt", dw)[0]
    assert not applicable("tt", nn.Conv2d(8, 8, 1, groups=2))[0]
    assert applicable("tt", nn.Linear(8, 8))[0] and applicable("tt", nn.Conv2d(8, 8, 1))[0]


def test_records_rebuild_tt_layers_from_a_weights_only_state_dict():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(12, 24, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 20))
    model = nn.Sequential(*[m for m in base]).eval()
    import copy

    model = copy.deepcopy(base)
    recs = []
    r = tt_conv(base[0].weight.detach(), None, 2, groups=2, max_iter=2)
    recs.append(replace_layer(model, "0", "tt", [r.C, r.Y, r.X, r.T]))
    r = tt_matrix(base[2].weight.detach(), None, (3, 4), out_modes=(2, 3, 4), in_modes=(3, 2, 2), max_iter=2)
    recs.append(replace_layer(model, "2", "tt", r.cores))
    r = tt_matrix(base[5].weight.detach(), None, 3, max_iter=2)
    recs.append(replace_layer(model, "5", "tt", r.cores))
    assert recs[1]["modes"] == [[2, 3, 4], [3, 2, 2]]
    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "records": recs}, buf)
    buf.seek(0)
    obj = torch.load(buf, weights_only=True)
    again = apply_replacements(base, obj["records"])
    again.load_state_dict(obj["state"])
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_compress_with_tt_saves_and_reloads(tmp_path):
    from ddtd.zoo import vgg_fmnist

    torch.manual_seed(0)
    kwargs = {"cfg": [16, "M", 16, "M", 32, "M", 32, "M"], "hidden": 64}
    model = vgg_fmnist(**kwargs).eval()
    src = tmp_path / "vgg.ddtd"
    save_model(model, src, spec={"source": "factory", "name": "ddtd.zoo:vgg_fmnist", "kwargs": kwargs})
    imgs = tmp_path / "imgs"
    write_images(imgs, 16, size=(32, 32))
    out = tmp_path / "c.ddtd"
    # --budget params: a TT-matrix saves weights, not multiply-adds, so the default budget keeps
    # Linear layers dense
    assert main(["compress", "--model", str(src), "--images", str(imgs), "--size", "32", "--ratio", "2",
                 "--method", "tt", "--max-iter", "3", "--budget", "params", "-o", str(out)]) == 0
    reloaded = load_model(out)
    kinds = {type(m) for m in reloaded.modules()}
    assert TTMatrix in kinds
    obj = torch.load(out, weights_only=True)
    assert any(r.get("kind") == "tt" for r in obj["replacements"])
    assert obj["report"]["ratio"] == pytest.approx(2, rel=0.03)
    assert obj["report"]["params_after"] == sum(p.numel() for p in reloaded.parameters())
    x = torch.randn(3, 3, 32, 32)
    again = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), again(x), rtol=0, atol=0)
