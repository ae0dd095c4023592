"""Low-rank + sparse solver (ddtd.solvers.lrs) and its layer (ddtd.layers.sparse)."""

import functools
import io

import pytest
import torch
from torch import nn

from ddtd.errors import InputError
from ddtd.layers.builders import dense_forward
from ddtd.layers.sparse import LowRankSparse
from ddtd.solvers import lrs as _lrs
from ddtd.solvers.lrs import INDEX_UNITS, solve_rows, storage_units
from ddtd.solvers.svd import sigma_svd
from synthetic import activation_patches, structured_kernel

F64 = torch.float64

# These tests check the maths in the Sigma they pass: undamped unless a test says otherwise
# (the solvers' default damping is tested in test_solver_numerics.py).
lowrank_sparse = functools.partial(_lrs.lowrank_sparse, damping=0.0)
magnitude_prune = functools.partial(_lrs.magnitude_prune, damping=0.0)
sigma_prune = functools.partial(_lrs.sigma_prune, damping=0.0)
split_budget = functools.partial(_lrs.split_budget, damping=0.0)


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
    # grouped layers: inconsistent groups, a 2-D sigma for groups > 1, a per-group rank too
    # large, tucker2 on a depthwise conv -- all name the layer
    dwk, dws = torch.randn(8, 1, 3, 3), torch.eye(9).expand(8, 9, 9)
    with pytest.raises(InputError, match="dw.*groups"):
        lowrank_sparse(dwk, dws, 1, 5, groups=4, name="dw")
    with pytest.raises(InputError, match="dw.*\\(g, D_g, D_g\\)"):
        lowrank_sparse(dwk, torch.eye(9), 1, 5, groups=8, name="dw")
    with pytest.raises(InputError, match="dw.*depthwise"):
        lowrank_sparse(dwk, dws, (1, 1), 5, lowrank="tucker2", name="dw")
    with pytest.raises(InputError, match="gc.*per group"):
        lowrank_sparse(torch.randn(8, 2, 3, 3), None, 5, 5, groups=2, name="gc")
    with pytest.raises(InputError, match="gc.*cannot be split"):
        sigma_prune(torch.randn(8, 2, 3, 3), None, 5, groups=3, name="gc")
    with pytest.raises(InputError, match="dw.*sigma has shape"):
        lowrank_sparse(dwk, torch.eye(4).expand(8, 4, 4), 1, 5, name="dw")
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
    # a grouped layer needs per-group factors (leading group dim)
    with pytest.raises(InputError, match="group"):
        LowRankSparse(layer, "svd", (torch.zeros(4, 1), torch.zeros(1, 18)),
                      torch.zeros(0, dtype=torch.int64), torch.zeros(0), name="gc")
    # a depthwise shared basis of the wrong size
    dw = nn.Conv2d(4, 4, 3, groups=4)
    with pytest.raises(InputError, match="dw.*shared-basis"):
        LowRankSparse(dw, "svd", (torch.zeros(4, 2), torch.zeros(2, 4)),
                      torch.zeros(0, dtype=torch.int64), torch.zeros(0), name="dw")
    with pytest.raises(InputError, match="outside"):
        LowRankSparse(dw, "none", (), torch.tensor([36]), torch.ones(1), name="dw")
    lin = nn.Linear(3, 2)
    with pytest.raises(InputError, match="outside"):
        LowRankSparse(lin, "none", (), torch.tensor([6]), torch.ones(1), name="fc")
    with pytest.raises(InputError):
        LowRankSparse.from_description({"kind": "svd"})


# ------------------------------------------------------------------------------ grouped / depthwise

def group_err(W, Wt, sigmas):
    """sum_k trace((W_k - W~_k) Sigma_k (W_k - W~_k)^T) / sum_k trace(W_k Sigma_k W_k^T)."""
    g = sigmas.shape[0]
    E = (W - Wt).reshape(g, -1, sigmas.shape[-1])
    Wg = W.reshape(g, -1, sigmas.shape[-1])
    return float(((E @ sigmas) * E).sum() / ((Wg @ sigmas) * Wg).sum())


def planted_grouped(g, Tg, Dg, r, ks, seed):
    """Per-group rank-r blocks plus ks[k] spikes (3-4) in group k, at distinct rows / columns."""
    gen = torch.Generator().manual_seed(seed)
    Ls, Ss = [], []
    for k in ks:
        Ls.append(torch.randn(Tg, r, generator=gen, dtype=F64)
                  @ torch.randn(r, Dg, generator=gen, dtype=F64) / Dg ** 0.5)
        S = torch.zeros(Tg, Dg, dtype=F64)
        rows, cols = torch.randperm(Tg, generator=gen)[:k], torch.randperm(Dg, generator=gen)[:k]
        S[rows, cols] = ((3 + torch.rand(k, generator=gen, dtype=F64))
                         * torch.randn(k, generator=gen).sign().to(F64))
        Ss.append(S)
    return torch.cat(Ls) + torch.cat(Ss), torch.cat(Ss)


def planted_depthwise(C, D, r, k, seed):
    """W = A B (shared basis, B (r, D)) plus k spikes, as (C, D)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(C, r, generator=gen, dtype=F64)
    B = torch.randn(r, D, generator=gen, dtype=F64) / D ** 0.5
    S = torch.zeros(C * D, dtype=F64)
    pos = torch.randperm(C * D, generator=gen)[:k]
    S[pos] = ((3 + torch.rand(k, generator=gen, dtype=F64))
              * torch.randn(k, generator=gen).sign().to(F64))
    return A @ B + S.reshape(C, D), S.reshape(C, D)


def support(res, shape):
    M = torch.zeros(shape, dtype=torch.bool)
    M[res.indices[:, 0], res.indices[:, 1]] = True
    return M


@pytest.mark.parametrize("init", ["masked", "auto"])
def test_grouped_planted_recovered(init):
    g, Tg, Sg, r, ks = 3, 24, 2, 2, (3, 4, 2)
    Dg = Sg * 9
    W, S0 = planted_grouped(g, Tg, Dg, r, ks, seed=1)
    sig = torch.stack([aniso_sigma(Dg, 60 + k, cond=1e2) for k in range(g)])
    K = W.reshape(g * Tg, Sg, 3, 3)
    res = lowrank_sparse(K, sig, r, sum(ks), init=init, max_iter=400, tol=0.0, dtype=F64,
                         name="gconv")
    assert res.groups == g and not res.shared
    assert res.A.shape == (g, Tg, r) and res.B.shape == (g, r, Dg)
    assert res.rel_error < 1e-10
    assert torch.allclose(res.kernel(), K, atol=1e-6)
    assert torch.equal(support(res, W.shape), S0 != 0)   # one support over all groups
    assert group_err(W, res.matrix(), sig) == pytest.approx(res.rel_error, abs=1e-14)
    # storage: per-group factors r (T_g + D_g) g, plus value + int32 index per nonzero
    assert res.storage_units == g * r * (Tg + Dg) + 2 * sum(ks)
    assert res.storage_units == storage_units(tuple(K.shape), "svd", r, sum(ks), groups=g)
    assert res.nbytes() == 4 * (g * r * (Tg + Dg) + sum(ks)) + 4 * sum(ks)


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_planted_shared_basis_recovered(mult):
    C, r, k = 24, 2, 12
    W, S0 = planted_depthwise(C * mult, 9, r, k, seed=5)
    # per-channel covariances: channel c feeds output rows [c*mult, (c+1)*mult)
    sig = torch.stack([aniso_sigma(9, 100 + c, cond=1e2) for c in range(C)])
    K = W.reshape(C * mult, 1, 3, 3)
    res = lowrank_sparse(K, sig, r, k, init="masked", max_iter=300, tol=0.0, dtype=F64,
                         mode="masking", name="dw")
    assert res.shared and res.groups == C
    assert res.A.shape == (C * mult, r) and res.B.shape == (r, 9)     # one shared basis
    assert res.rel_error < 1e-6
    assert res.rel_error < 1e-12                                     # in fact exact
    assert torch.equal(support(res, W.shape), S0 != 0)
    assert torch.allclose(res.kernel(), K, atol=1e-6)
    h = res.history
    assert all(b <= a * (1 + 1e-12) for a, b in zip(h, h[1:]))
    # honest storage: r (T + kh kw) shared factors, not r (T_g + 1) per channel
    assert res.lowrank_params == r * (C * mult + 9)
    assert res.storage_units == storage_units(tuple(K.shape), "svd", r, k, groups=C)
    # the sparse + masking convention is unchanged
    assert torch.allclose(res.values, W[res.indices[:, 0], res.indices[:, 1]], atol=1e-6)


def test_depthwise_equal_sigmas_is_the_sigma_svd():
    """With the same Sigma for every channel the shared-basis fit is the Sigma-SVD of the
    (C, kh*kw) matrix (closed form); the alternation keeps it."""
    W = structured_kernel(16, 1, 3, seed=2, noise=0.5).to(F64)             # (16, 1, 3, 3)
    s = aniso_sigma(9, 3)
    res = lowrank_sparse(W, s.expand(16, 9, 9).clone(), 3, 0, init="data", max_iter=5,
                         dtype=F64)
    want = sigma_svd(W, s, 3, dtype=F64).rel_error
    assert res.rel_error == pytest.approx(want, rel=1e-9, abs=1e-14)


def test_depthwise_shared_basis_is_stationary():
    """Alternating exact solves: at the end, the gradient of
    f(A, B) = sum_c (w_c - a_c B) Sigma_c (w_c - a_c B)^T w.r.t. A and B vanishes."""
    C = 20
    W = structured_kernel(C, 1, 3, seed=9, noise=0.4).to(F64).reshape(C, 9)
    sig = torch.stack([aniso_sigma(9, 200 + c, cond=1e3) for c in range(C)])
    res = lowrank_sparse(W.reshape(C, 1, 3, 3), sig, 2, 0, init="data", max_iter=200, tol=0.0,
                         basis_iter=20, dtype=F64)
    A, B = res.A, res.B
    E = torch.bmm((W - A @ B)[:, None], sig)[:, 0]               # rows (w_c - a_c B) Sigma_c
    gA, gB = E @ B.T, A.T @ E
    scale = float(torch.linalg.norm(torch.bmm(W[:, None], sig)[:, 0]))
    assert float(torch.linalg.norm(gA)) < 1e-6 * scale
    assert float(torch.linalg.norm(gB)) < 1e-6 * scale * float(torch.linalg.norm(A))


def test_grouped_history_non_increasing_and_error_explicit():
    g = 2
    Kg = structured_kernel(16, 6, 3, seed=11, noise=0.5).to(F64)            # (16, 3 per group)
    Kg = Kg.reshape(16, 6, 3, 3)[:, :3].contiguous()                         # S/g = 3
    sg = torch.stack([aniso_sigma(27, 40 + k, cond=1e4) for k in range(g)])
    Kd = structured_kernel(12, 1, 3, seed=12, noise=0.5).to(F64)             # depthwise
    sd = torch.stack([aniso_sigma(9, 70 + k, cond=1e4) for k in range(12)])
    cases = [(Kg, sg, "svd", 3), (Kg, sg, "tucker2", (3, 2)), (Kd, sd, "svd", 2)]
    for K, sig, lowrank, rank in cases:
        for init in ("residual", "masked", "data"):
            res = lowrank_sparse(K, sig, rank, density=0.1, init=init, lowrank=lowrank,
                                 max_iter=6, tucker_iter=4, dtype=F64)
            h = res.history
            assert h[0] == pytest.approx(res.init_error)
            assert all(b <= a * (1 + 1e-12) for a, b in zip(h, h[1:])), (init, lowrank, h)
            W = K.reshape(K.shape[0], -1)
            assert group_err(W, res.matrix(), sig) == pytest.approx(res.rel_error, rel=1e-8)
            assert res.rel_error == pytest.approx(h[-1], rel=1e-8, abs=1e-14)
            assert res.nnz == round(0.1 * W.numel())
            assert res.storage_units == storage_units(tuple(K.shape), lowrank, rank, res.nnz,
                                                      groups=sig.shape[0])


def test_grouped_solution_equals_per_group_solves():
    g, Tg, Sg = 3, 10, 2
    Dg = Sg * 9
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(g * Tg, Dg, generator=gen, dtype=F64)
    W[Tg:2 * Tg] *= 3                           # groups of different size compete for nonzeros
    sig = torch.stack([aniso_sigma(Dg, 80 + k) for k in range(g)])
    # the row solve with a (g, D, D) stack = per-group row solves
    mask = torch.rand(g * Tg, Dg, generator=gen) < 0.3
    S = solve_rows(W, sig, mask, chunk_bytes=8 * 18 * 18 * 4)
    for k in range(g):
        blk = slice(k * Tg, (k + 1) * Tg)
        assert torch.allclose(S[blk], solve_rows(W[blk], sig[k], mask[blk]), atol=1e-12)
    # the whole fit with the support split fixed (masked start, no support switching)
    K = W.reshape(g * Tg, Sg, 3, 3)
    opts = dict(init="masked", candidates=(), max_iter=5, tol=0.0, dtype=F64)
    res = lowrank_sparse(K, sig, 2, 60, **opts)
    M = support(res, W.shape)
    counts = [int(M[k * Tg:(k + 1) * Tg].sum()) for k in range(g)]
    assert sum(counts) == 60 and counts[1] > counts[0]      # joint top-k, not an even split
    for k in range(g):
        blk = slice(k * Tg, (k + 1) * Tg)
        rk = lowrank_sparse(K[blk], sig[k], 2, counts[k], **opts)
        assert torch.equal(support(rk, (Tg, Dg)), M[blk])
        assert torch.allclose(rk.matrix(), res.matrix()[blk], atol=1e-9, rtol=1e-9), k
        assert torch.allclose(rk.A, res.A[k], atol=1e-9) or \
            torch.allclose(rk.A @ rk.B, res.A[k] @ res.B[k], atol=1e-9)


def test_grouped_baselines_and_split_budget():
    g = 8                                                     # depthwise, 8 channels
    K = structured_kernel(8, 1, 3, seed=6, noise=0.4).to(F64)
    sig = torch.stack([aniso_sigma(9, 300 + k) for k in range(g)])
    W = K.reshape(8, 9)
    mp = magnitude_prune(K, sig, 20)
    sp = sigma_prune(K, sig, 20)
    assert mp.groups == sp.groups == g
    assert sp.rel_error < mp.rel_error
    thr = W.abs().flatten().topk(20).values.min()
    assert torch.equal(mp.values.to(F64), W[W.abs() >= thr])
    assert mp.rel_error == pytest.approx(group_err(W, mp.matrix(), sig), rel=1e-10)
    # Frobenius with an explicit groups keyword
    assert magnitude_prune(K, None, 20, groups=g).groups == g
    budget = 40
    rank, nnz, res, table = split_budget(K, sig, budget, max_iter=3)
    assert res.groups == g and res.storage_units <= budget
    assert res.rel_error == min(t[3] for t in table)
    for f, r, n, e in table:
        assert storage_units(tuple(K.shape), "svd", r, n, groups=g) <= budget
    assert max(t[1] for t in table) == budget // (8 + 9)      # one shared rank: T + kh*kw
    # grouped (S/g > 1): one rank costs g (T_g + D_g)
    Kg = structured_kernel(12, 4, 3, seed=7, noise=0.4).to(F64).reshape(12, 4, 3, 3)[:, :2]
    rank, nnz, res, table = split_budget(Kg.contiguous(), None, 150, max_iter=2, groups=2)
    assert max(t[1] for t in table) == 150 // (2 * (6 + 18))
    assert all(storage_units((12, 2, 3, 3), "svd", r, n, groups=2) <= 150 for _, r, n, _ in table)


def _depthwise_activations(C, n=24, size=20, seed=0):
    """Random images through a small conv stack (conv 3->C/2, ReLU, conv C/2->C, ReLU)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen)
    c1 = nn.Conv2d(3, C // 2, 3, padding=1)
    c2 = nn.Conv2d(C // 2, C, 3, padding=1)
    with torch.no_grad():
        for m in (c1, c2):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5)
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        return torch.relu(c2(torch.relu(c1(x)))).to(F64)


def test_depthwise_data_fit_beats_magnitude_pruning_at_equal_storage():
    C = 32
    act = _depthwise_activations(C)
    layer = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).to(F64)
    with torch.no_grad():                    # related filters: a few shapes plus noise
        layer.weight.copy_(structured_kernel(C, 1, 3, seed=8, decay=0.5, noise=0.4).to(F64))
    K = layer.weight.detach()
    # per-channel input covariance of the 3x3 patches (zero padding included)
    P = torch.nn.functional.unfold(act, 3, padding=1).reshape(act.shape[0], C, 9, -1)
    sig = torch.einsum("ncil,ncjl->cij", P, P) / (P.shape[0] * P.shape[-1])
    budget = int(0.4 * C * 9)
    rank, nnz, fit, table = split_budget(K, sig, budget, max_iter=10, init="auto")
    assert fit.storage_units <= budget
    mp = magnitude_prune(K, sig, budget // (1 + INDEX_UNITS))
    assert mp.storage_units <= budget

    def out_err(Kt):                         # the real output error of the depthwise conv
        y = nn.functional.conv2d(act, K, padding=1, groups=C)
        yt = nn.functional.conv2d(act, Kt.to(F64), padding=1, groups=C)
        return float(((y - yt) ** 2).sum() / (y ** 2).sum())

    e_fit, e_mp = out_err(fit.kernel()), out_err(mp.kernel())
    assert e_fit == pytest.approx(fit.rel_error, rel=1e-4)     # Sigma error = output error
    assert e_mp == pytest.approx(mp.rel_error, rel=1e-4)
    assert e_fit < 0.8 * e_mp, (e_fit, e_mp, table)
    e_sp = sigma_prune(K, sig, budget // 2).rel_error
    assert e_fit <= e_sp * (1 + 1e-6)
    # the split with one shared basis filter (r (T + 9) units) also beats both prunings
    r1 = lowrank_sparse(K, sig, 1, (budget - (C + 9)) // 2, init="auto", max_iter=10)
    assert r1.shared and r1.storage_units <= budget
    assert out_err(r1.kernel()) < min(0.8 * e_mp, e_sp)


GROUPED_LAYERS = [
    ("dw 3x3", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 6), "svd", 2),
    ("dw x2 stride/dil reflect", lambda: nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2,
                                                   groups=6, padding_mode="reflect"),
     (2, 6, 11, 9), "svd", 3),
    ("dw same even replicate", lambda: nn.Conv2d(4, 4, (2, 4), padding="same", groups=4,
                                                 padding_mode="replicate", bias=False),
     (2, 4, 8, 9), "svd", 2),
    ("dw 5x5 circular", lambda: nn.Conv2d(5, 5, 5, padding=2, groups=5, padding_mode="circular"),
     (1, 5, 9, 8), "svd", 4),
    ("dw 1x1", lambda: nn.Conv2d(6, 6, 1, groups=6), (2, 6, 5, 5), "svd", 1),
    ("dw sparse only", lambda: nn.Conv2d(6, 6, 3, stride=2, groups=6), (2, 6, 9, 9), "svd", 0),
    ("grouped 3x3", lambda: nn.Conv2d(8, 12, 3, stride=(1, 2), padding=(1, 0), groups=2),
     (2, 8, 9, 9), "svd", 3),
    ("grouped 1x1", lambda: nn.Conv2d(8, 8, 1, groups=4), (2, 8, 5, 6), "svd", 1),
    ("grouped tucker2 circular", lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2,
                                                   padding_mode="circular"),
     (2, 8, 7, 7), "tucker2", (3, 2)),
    ("grouped same dil", lambda: nn.Conv2d(6, 9, 3, padding="same", dilation=2, groups=3),
     (1, 6, 10, 10), "svd", 2),
]


@pytest.mark.parametrize("case", GROUPED_LAYERS, ids=[c[0] for c in GROUPED_LAYERS])
def test_grouped_layer_forward_equals_dense_and_rebuilds(case, tmp_path):
    import copy
    _, make, xshape, lowrank, rank = case
    torch.manual_seed(2)
    layer = make()
    g = layer.groups
    K = layer.weight.detach()
    D = K[0].numel()
    xs = torch.randn(64, layer.in_channels, 6, 6)                 # per-group Sigma of patches
    P = torch.nn.functional.unfold(xs, K.shape[-2:]).reshape(64, g, D, -1)
    sig = torch.einsum("ngil,ngjl->gij", P, P) / (64 * P.shape[-1])
    res = lowrank_sparse(K, sig, rank, density=0.2, lowrank=lowrank, init="data", max_iter=2,
                         name="l")
    assert res.groups == g
    bias = None if layer.bias is None else torch.randn(layer.weight.shape[0])
    ref_layer = copy.deepcopy(layer)                       # F.conv2d with the dense W~
    with torch.no_grad():
        ref_layer.weight.copy_(res.kernel())
        if bias is not None:
            ref_layer.bias.copy_(bias)
    x = torch.randn(*xshape)
    with torch.no_grad():
        ref = ref_layer(x)
    for fm in ("merged", "chain", "sparse"):
        m = LowRankSparse.from_result(layer, res, bias, forward_mode=fm, name="l")
        with torch.no_grad():
            assert torch.allclose(m(x), ref, atol=1e-5, rtol=1e-5), fm
        assert torch.allclose(m.weight(), res.kernel(), atol=1e-6)
    m.forward_mode = "merged"
    m(x).sum().backward()
    assert m.values.grad is not None and m.values.grad.abs().sum() > 0
    if m.lowrank is not None:
        assert all(p.grad is not None for p in m.lowrank.parameters())
    # counting: exactly the solver's factors + values (+ bias), int32 index
    n_b = 0 if m.bias is None else m.bias.numel()
    assert m.count_params() == res.lowrank_params + res.nnz + n_b
    assert m.nbytes() == 4 * (res.lowrank_params + res.nnz + n_b) + 4 * res.nnz
    assert m.index.dtype == torch.int32
    if res.shared and res.lowrank != "none":
        assert res.lowrank_params == rank * (K.shape[0] + D)
    # rebuild from plain description + weights_only state dict
    desc = m.describe()
    assert desc["layer"]["groups"] == g
    path = tmp_path / "m.pt"
    torch.save({"desc": desc, "state": m.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    m2 = LowRankSparse.from_description(blob["desc"])
    m2.load_state_dict(blob["state"])
    assert set(m2.state_dict()) == set(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
    assert m2.count_params() == m.count_params() and m2.nbytes() == m.nbytes()


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ fast paths

def test_row_solve_batches_cached_factors_and_cg_paths():
    """Size-batched / cached exact row solves equal the per-row least squares; the CG row
    solver (used when factorising a support is too costly) is a descent step close to exact."""
    from ddtd.solvers import lrs as L
    X = activation_patches(8, 3, 8, 10, seed=11).to(F64)
    sigma = X.T @ X / X.shape[0]
    W = structured_kernel(20, 8, 3, seed=12, noise=0.4).to(F64)
    Wm = W.reshape(20, -1)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(20, 72, generator=g) < torch.linspace(0.02, 0.6, 20)[:, None]  # uneven rows
    fac = L._factor_rows(sigma, mask, chunk_bytes=8 * 40 * 40 * 2)                   # small batches
    S1 = L._solve_rows(Wm, sigma, mask, Wm @ sigma, factors=fac)
    S2 = solve_rows(Wm, sigma, mask)
    for t in range(20):
        J = mask[t].nonzero().squeeze(1)
        want = torch.zeros(72, dtype=F64)
        if len(J):
            want[J] = torch.linalg.solve(sigma[J][:, J], (Wm[t] @ sigma)[J])
        assert torch.allclose(S1[t], want, atol=1e-8, rtol=1e-8), t
    assert torch.allclose(S1, S2, atol=1e-10, rtol=1e-9)
    ex = lowrank_sparse(W, sigma, 3, 300, init="data", max_iter=8, row_solver="exact", dtype=F64)
    cg = lowrank_sparse(W, sigma, 3, 300, init="data", max_iter=8, row_solver="cg", cg_iter=40,
                        dtype=F64)
    h = cg.history
    assert all(b <= a * (1 + 1e-12) for a, b in zip(h, h[1:]))
    assert cg.rel_error == pytest.approx(h[-1], rel=1e-8)
    assert cg.rel_error < 1.02 * ex.rel_error
    with pytest.raises(InputError, match="row_solver"):
        lowrank_sparse(W, sigma, 3, 300, row_solver="lu")


def test_split_budget_refined_search_matches_grid():
    X = activation_patches(16, 3, 6, 10, seed=2).to(F64)
    sigma = X.T @ X / X.shape[0]
    K = structured_kernel(32, 16, 3, seed=3, noise=0.3).to(F64)
    budget = 32 * 144 // 3
    r1, n1, res1, t1 = split_budget(K, sigma, budget, max_iter=3, search="grid")
    r2, n2, res2, t2 = split_budget(K, sigma, budget, max_iter=3)
    assert (r1, n1) == (r2, n2) and res2.rel_error == pytest.approx(res1.rel_error, rel=1e-9)
    assert len(t2) < len(t1) and set(t2) <= set(t1)
    assert [row[0] for row in t2] == sorted(row[0] for row in t2)
