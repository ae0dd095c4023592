"""Low-rank + sparse solver (ddtd.solvers.lrs) and its layer (ddtd.layers.sparse)."""

import io

import pytest
import torch
from torch import nn

from ddtd.errors import InputError
from ddtd.layers.builders import dense_forward
from ddtd.layers.sparse import LowRankSparse
from ddtd.solvers.lrs import (INDEX_UNITS, lowrank_sparse, magnitude_prune, sigma_prune,
                              solve_rows, split_budget, storage_units)
from ddtd.solvers.svd import sigma_svd
from ddtd.solvers.synthetic import activation_patches, structured_kernel

F64 = torch.float64


def aniso_sigma(D, seed, cond=1e3):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))[0]
    return (Q * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), D, dtype=F64)) @ Q.T


def planted(T, D, r, k, seed):
    """rank-r matrix (entries ~ 1/sqrt(D) * sqrt(r)) plus k spikes of magnitude 3-4."""
    g = torch.Generator().manual_seed(seed)
    L = (torch.randn(T, r, generator=g, dtype=F64) @ torch.randn(r, D, generator=g, dtype=F64)
         / D ** 0.5)
    S = torch.zeros(T * D, dtype=F64)
    pos = torch.randperm(T * D, generator=g)[:k]
    S[pos] = (3 + torch.rand(k, generator=g, dtype=F64)) * torch.randn(k, generator=g).sign().to(F64)
    return L + S.reshape(T, D), S.reshape(T, D)


# ------------------------------------------------------------------------------ row solve

def test_row_solve_equals_brute_force_least_squares():
    g = torch.Generator().manual_seed(0)
    N, T, D = 200, 7, 12
    X = torch.randn(N, D, generator=g, dtype=F64) @ torch.randn(D, D, generator=g, dtype=F64)
    sigma = X.T @ X / N
    R = torch.randn(T, D, generator=g, dtype=F64)
    mask = torch.rand(T, D, generator=g) < 0.4
    mask[0] = False                      # an empty row
    mask[1] = True                       # a full row: s = R_t exactly
    S = solve_rows(R, sigma, mask, chunk_bytes=8 * 12 * 12 * 3)   # several chunks
    for t in range(T):
        J = mask[t].nonzero().squeeze(1)
        want = torch.zeros(D, dtype=F64)
        if len(J):
            # min_s E||(R_t - s) x||^2 = ||X (R_t - s)^T||^2 / N over s supported on J
            want[J] = torch.linalg.lstsq(X[:, J], X @ R[t], driver="gelsd").solution
        assert torch.allclose(S[t], want, atol=1e-9, rtol=1e-9), t
    assert torch.allclose(S[1], R[1], atol=1e-10)
    assert (S[~mask] == 0).all()
    # and it is not the naive copy R_tJ when Sigma is correlated
    assert not torch.allclose(S[mask], R[mask], atol=1e-3)
    # Frobenius: values are copied
    assert torch.equal(solve_rows(R, None, mask), torch.where(mask, R, 0.0))


# ------------------------------------------------------------------------------ planted recovery

@pytest.mark.parametrize("init", ["masked", "auto"])
def test_planted_matrix_recovered_exactly(init):
    W, S0 = planted(40, 30, 3, 30, 0)
    sigma = aniso_sigma(30, 1)
    res = lowrank_sparse(W, sigma, 3, 30, init=init, max_iter=200, tol=0.0, dtype=F64, name="fc")
    assert res.rel_error < 1e-8
    assert torch.allclose(res.matrix(), W, atol=1e-6)
    got = torch.zeros_like(W)
    got[res.indices[:, 0], res.indices[:, 1]] = 1
    assert torch.equal(got.bool(), S0 != 0)          # the planted support is found


def test_planted_conv_recovered_exactly_and_masking_values():
    W, S0 = planted(24, 36, 2, 20, 3)
    K = W.reshape(24, 4, 3, 3)
    sigma = aniso_sigma(36, 2)
    res = lowrank_sparse(K, sigma, 2, 20, init="masked", max_iter=400, tol=0.0, dtype=F64,
                         mode="masking", name="conv")
    assert res.rel_error < 1e-8
    assert torch.allclose(res.kernel(), K, atol=1e-6)
    # masking convention: on the mask the stored value replaces L, so it equals W there
    assert torch.allclose(res.values, W[res.indices[:, 0], res.indices[:, 1]], atol=1e-6)


def test_masking_and_additive_give_same_approximation():
    W = structured_kernel(30, 8, 3, seed=1, noise=0.3).to(F64)
    sigma = aniso_sigma(72, 3)
    a = lowrank_sparse(W, sigma, 4, 120, init="data", max_iter=5, dtype=F64)
    m = lowrank_sparse(W, sigma, 4, 120, init="data", max_iter=5, dtype=F64, mode="masking")
    assert torch.allclose(a.matrix(), m.matrix(), atol=1e-10)
    assert not torch.allclose(a.values, m.values)
    assert torch.allclose(a.values, m.sparse_delta(), atol=1e-10)


# ------------------------------------------------------------------------------ fit quality

def _output_error(X, W, Wt):
    return float(((X @ (W - Wt).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


@pytest.mark.parametrize("frac", [0.5, 0.25])
def test_data_fit_beats_baselines_at_equal_storage(frac):
    X = activation_patches(32, 1, 24, 10, seed=4).to(F64)          # (2400, 32) ReLU activations
    sigma = X.T @ X / X.shape[0]                                     # uncentred: output error
    W = structured_kernel(128, 32, 1, seed=5, decay=0.5, noise=0.4).reshape(128, 32).to(F64)
    T, D = W.shape
    budget = int(frac * T * D)                                       # 4-byte units
    r = int(0.5 * budget) // (T + D)
    nnz = (budget - r * (T + D)) // (1 + INDEX_UNITS)
    assert storage_units((T, D), "svd", r, nnz) <= budget
    fit = lowrank_sparse(W, sigma, r, nnz, init="auto", max_iter=15, dtype=F64)
    e_fit = _output_error(X, W, fit.matrix())
    assert abs(e_fit - fit.rel_error) < 1e-9 * max(1.0, e_fit) + 1e-12   # Sigma error = output error
    others = {
        "residual init": lowrank_sparse(W, sigma, r, nnz, init="residual", max_iter=0, dtype=F64),
        "masked init": lowrank_sparse(W, sigma, r, nnz, init="masked", max_iter=0, dtype=F64),
        "seed residual (Frobenius)": lowrank_sparse(W, None, r, nnz, init="residual", max_iter=0,
                                                    dtype=F64),
        "seed masked (Frobenius)": lowrank_sparse(W, None, r, nnz, init="masked", max_iter=0,
                                                  dtype=F64),
        "magnitude pruning": magnitude_prune(W, sigma, budget // (1 + INDEX_UNITS), dtype=F64),
    }
    errs = {k: _output_error(X, W, v.matrix()) for k, v in others.items()}
    r_lr = budget // (T + D)
    lr = sigma_svd(W, sigma, r_lr, dtype=F64)
    errs["low-rank only"] = _output_error(X, W, lr.A @ lr.B)
    for k, e in errs.items():
        assert e_fit < 0.97 * e, (k, e_fit, e)


def test_history_non_increasing_all_inits_and_tucker2():
    W = structured_kernel(24, 8, 3, seed=7, noise=0.5).to(F64)
    sigma = aniso_sigma(72, 8, cond=1e4)
    for init in ("residual", "masked", "data"):
        for lowrank, rank in (("svd", 5), ("tucker2", (6, 4))):
            res = lowrank_sparse(W, sigma, rank, density=0.08, init=init, lowrank=lowrank,
                                 max_iter=6, tucker_iter=4, dtype=F64)
            h = res.history
            assert h[0] == pytest.approx(res.init_error)
            assert all(b <= a * (1 + 1e-12) for a, b in zip(h, h[1:])), (init, lowrank, h)
            assert res.rel_error == pytest.approx(h[-1], rel=1e-8, abs=1e-14)
            assert torch.allclose(torch.as_tensor(res.rel_error, dtype=F64),
                                  torch.as_tensor(float(((W.reshape(24, -1) - res.matrix()) @ sigma
                                                         * (W.reshape(24, -1) - res.matrix())).sum()
                                                        / ((W.reshape(24, -1) @ sigma)
                                                           * W.reshape(24, -1)).sum()),
                                                  dtype=F64), rtol=1e-8)
            assert res.nnz == round(0.08 * 24 * 72)


def test_pruning_baselines_and_split_budget():
    X = activation_patches(16, 3, 6, 10, seed=2).to(F64)
    sigma = X.T @ X / X.shape[0]
    K = structured_kernel(32, 16, 3, seed=3, noise=0.3).to(F64)
    W = K.reshape(32, -1)
    mp = magnitude_prune(K, sigma, 400)
    sp = sigma_prune(K, sigma, 400)
    assert mp.nnz == sp.nnz == 400 and mp.rank == (0,)
    assert sp.rel_error < mp.rel_error                       # exact values beat copied values
    thr = W.abs().flatten().topk(400).values.min()
    assert torch.equal(mp.values.to(F64), W[W.abs() >= thr])  # row-major order, values copied
    budget = 32 * 144 // 3
    rank, nnz, res, table = split_budget(K, sigma, budget, max_iter=3)
    assert res.storage_units <= budget
    assert res.rel_error == min(t[3] for t in table)
    assert len(table) >= 5
    assert table[0][1] == 0 and table[0][2] == budget // 2         # pure sparse split tried
    assert table[-1][1] == budget // (32 + 144)                     # pure low-rank split tried
    for f, r, n, e in table:
        assert storage_units((32, 16, 3, 3), "svd", r, n) <= budget


def test_errors_name_the_layer():
    W = torch.randn(8, 6)
    with pytest.raises(InputError, match="blk.fc"):
        lowrank_sparse(W, None, 2, 10_000, name="blk.fc")
    with pytest.raises(InputError, match="blk.fc"):
        lowrank_sparse(W, None, 2, 5, mode="mask", name="blk.fc")
    with pytest.raises(InputError, match="blk.fc"):
        lowrank_sparse(W, torch.eye(5), 2, 5, name="blk.fc")
    with pytest.raises(InputError, match="grouped"):
        lowrank_sparse(torch.randn(8, 1, 3, 3), torch.eye(9).expand(8, 9, 9), 1, 5, name="dw")
    with pytest.raises(InputError, match="exactly one"):
        lowrank_sparse(W, None, 2, 5, density=0.1, name="x")


# ------------------------------------------------------------------------------ layer

LAYERS = [
    ("linear", lambda: nn.Linear(20, 12), (3, 5, 20), "svd", 4),
    ("1x1", lambda: nn.Conv2d(16, 24, 1), (2, 16, 7, 6), "svd", 5),
    ("3x3 stride/pad/dil", lambda: nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2),
     (2, 6, 11, 9), "svd", 3),
    ("reflect same even", lambda: nn.Conv2d(5, 7, (2, 4), padding="same", padding_mode="reflect",
                                            bias=False), (2, 5, 8, 9), "svd", 2),
    ("circular", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (1, 4, 6, 6),
     "svd", 2),
    ("tucker2", lambda: nn.Conv2d(8, 12, 3, stride=(1, 2), padding=(1, 0)), (2, 8, 9, 9),
     "tucker2", (5, 3)),
    ("sparse only", lambda: nn.Conv2d(4, 6, 3, padding=1), (1, 4, 6, 6), "svd", 0),
]


@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_forward_equals_dense_and_rebuilds(case, tmp_path):
    _, make, xshape, lowrank, rank = case
    torch.manual_seed(1)
    layer = make()
    W = layer.weight.detach()
    res = lowrank_sparse(W, None, rank, density=0.15, lowrank=lowrank, init="data", max_iter=2,
                         name="l")
    x = torch.randn(*xshape)
    ref = dense_forward(layer, x, res.kernel())
    bias = None if layer.bias is None else torch.randn(layer.weight.shape[0])
    if bias is not None:
        ref = dense_forward(layer, x, res.kernel(), bias)
    outs = {}
    for fm in ("merged", "chain", "sparse"):
        m = LowRankSparse.from_result(layer, res, bias, forward_mode=fm, name="l")
        with torch.no_grad():
            outs[fm] = m(x)
        assert torch.allclose(outs[fm], ref, atol=1e-5, rtol=1e-5), fm
    # gradients reach values and factors in merged mode
    m.forward_mode = "merged"
    m(x).sum().backward()
    assert m.values.grad is not None and m.values.grad.abs().sum() > 0
    # counting: factors + values + bias, int32 index
    n_fac = res.lowrank_params
    n_b = 0 if m.bias is None else m.bias.numel()
    assert m.count_params() == n_fac + res.nnz + n_b
    assert m.index.dtype == torch.int32
    assert m.nbytes() == 4 * (n_fac + res.nnz + n_b) + 4 * res.nnz
    # rebuild from plain description + weights_only state dict
    desc = m.describe()
    path = tmp_path / "m.pt"
    torch.save({"desc": desc, "state": m.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    m2 = LowRankSparse.from_description(blob["desc"])
    m2.load_state_dict(blob["state"])
    with torch.no_grad():
        y2 = m2(x)
        m.forward_mode = "merged"
        y1 = m(x)
    assert torch.equal(y1, y2)
    assert set(m2.state_dict()) == set(m.state_dict())


def test_layer_cache_invalidated_on_load():
    layer = nn.Linear(10, 6)
    res = lowrank_sparse(layer.weight.detach(), None, 2, 12, init="data", max_iter=1)
    m = LowRankSparse.from_result(layer, res)
    x = torch.randn(4, 10)
    with torch.no_grad():
        y0 = m(x)
        sd = {k: v * 2 for k, v in m.state_dict().items()}
        sd["index"] = m.index.clone()
        m.load_state_dict(sd)
        y1 = m(x)
    # L = A B scales by 4, S and bias by 2
    L = res.lowrank_matrix()
    S = res.sparse_matrix()
    want = x @ (4 * L + 2 * S).T + 2 * layer.bias.detach()
    assert torch.allclose(y1, want, atol=1e-5)
    assert not torch.allclose(y0, y1)


def test_layer_rejects_bad_inputs():
    layer = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(InputError, match="groups"):
        LowRankSparse(layer, "none", (), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                      name="dw")
    lin = nn.Linear(3, 2)
    with pytest.raises(InputError, match="outside"):
        LowRankSparse(lin, "none", (), torch.tensor([6]), torch.ones(1), name="fc")
    with pytest.raises(InputError):
        LowRankSparse.from_description({"kind": "svd"})


pytestmark = pytest.mark.usefixtures("single_thread")
