"""Tests of ddtd.solvers.stable_cp (issue 6): sensitivity formula, the exact ellipsoid
subproblem against scipy, feasibility after every sweep, monotone sensitivity, planted
degenerate CP, Sigma / Frobenius / block paths, groups, errors."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from ddtd.errors import InputError, NumericalError
from ddtd.solvers import CPResult
from ddtd.solvers import cp_als as _cp_als
from ddtd.solvers import stable_cp as _stable_cp
from ddtd.solvers.cp import khatri_rao
from ddtd.solvers.stable_cp import (StableCPResult, _Group, _secular, balance,
                                    ellipsoid_least_norm, sensitivity)

F64 = torch.float64

# These tests check the maths in the Sigma they pass: undamped (the solvers' default damping is
# tested in test_solver_numerics.py).
cp_als = functools.partial(_cp_als, damping=0.0)
stable_cp = functools.partial(_stable_cp, damping=0.0)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def aniso_sigma(D, cond=1e3, seed=0):
    Q, _ = torch.linalg.qr(randn(D, D, seed=seed + 100))
    return (Q * torch.logspace(0, -math.log10(cond), D, dtype=F64)) @ Q.T


def abs_err(W, What, S):
    dW = (W.reshape(W.shape[0], -1) - What.reshape(W.shape[0], -1)).double()
    return float((dW ** 2).sum()) if S is None else float(((dW @ S) * dW).sum())


def base_of(W, S):
    return abs_err(W, torch.zeros_like(W), S)


def planted_degenerate(T=8, S=6, k=3, R0=3, s=1e3, eps=1e-2, noise=0.05, seed=0):
    """A well-conditioned rank-R0 CP plus ``s (a o b o c - a' o b' o c')`` with ``a' ~ a``
    (``eps``) -- two huge, nearly cancelling terms -- plus noise.  Returns the kernel and the
    planted factors (the degenerate, CP-ALS-like solution) as a CPResult."""
    P = k * k
    A0, B0, C0 = randn(T, R0, seed=seed), randn(S, R0, seed=seed + 1), randn(P, R0, seed=seed + 2)
    a, b, c = [x / x.norm() for x in (randn(T, seed=seed + 3), randn(S, seed=seed + 4),
                                      randn(P, seed=seed + 5))]
    a2 = a + eps * randn(T, seed=seed + 6)
    b2 = b + eps * randn(S, seed=seed + 7)
    c2 = c + eps * randn(P, seed=seed + 8)
    A = torch.cat([A0, s * a[:, None], -s * a2[:, None]], 1)
    B = torch.cat([B0, b[:, None], b2[:, None]], 1)
    C = torch.cat([C0, c[:, None], c2[:, None]], 1)
    K = torch.einsum("tr,sr,pr->tsp", A, B, C)
    K = K + noise * K.norm() / math.sqrt(K.numel()) * randn(*K.shape, seed=seed + 9)
    return K.reshape(T, S, k, k), CPResult("cp3", A, B, C, None, (k, k), rel_error=0.0)


def check_run(res, W, S, base):
    """Constraint after every sweep, non-increasing sensitivity, consistent final error.
    The subproblems are solved exactly, so the constraint is active after every sweep (an
    inexact Hessian would make the explicit-error safeguard shorten the steps)."""
    d2 = res.delta ** 2
    for h in res.history:
        assert h * base <= d2 * (1 + 1e-6) + 1e-14 * base
    for h in res.history[1:-1]:                 # the sweeps; the last entry: after the finish
        assert h * base >= d2 * (1 - 1e-6)
    assert res.history[-1] == res.rel_error
    sh = res.sensitivity_history
    assert all(b <= a * (1 + 1e-12) for a, b in zip(sh, sh[1:]))
    assert res.sensitivity_after <= res.sensitivity_before * (1 + 1e-12)
    assert abs_err(W, res.kernel(), S) <= d2 * (1 + 1e-6) + 1e-14 * base
    assert res.rel_error == pytest.approx(abs_err(W, res.kernel(), S) / base, rel=1e-6, abs=1e-14)
    assert res.sensitivity_after == pytest.approx(
        sensitivity(res.A, res.B, res.C, res.E), rel=1e-9)


# ----------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("layout", ["cp3", "cp4"])
def test_sensitivity_equals_squared_jacobian_norm(layout):
    # ss = lim E||T(F + dF) - T(F)||^2 / sigma^2 = ||d vec(T) / d(all factor entries)||_F^2
    dims = [5, 4, 3] if layout == "cp3" else [5, 4, 3, 2]
    R = 3
    facs = [randn(n, R, seed=i) for i, n in enumerate(dims)]
    expr = "ar,br,cr->abc" if layout == "cp3" else "ar,br,cr,dr->abcd"
    J = torch.autograd.functional.jacobian(lambda *f: torch.einsum(expr, *f).reshape(-1),
                                           tuple(facs))
    ref = sum(float((j ** 2).sum()) for j in J)
    assert sensitivity(*facs) == pytest.approx(ref, rel=1e-12)
    if layout == "cp3":     # the seed's closed form
        A, B, C = facs
        I, J_, K = dims
        seed_ss = (K * torch.trace((A.T @ A) * (B.T @ B)) + I * torch.trace((B.T @ B) * (C.T @ C))
                   + J_ * torch.trace((A.T @ A) * (C.T @ C)))
        assert sensitivity(*facs) == pytest.approx(float(seed_ss), rel=1e-12)
    # grouped factors: sum over groups
    g2 = [torch.stack([f, 2 * f]) for f in facs]
    assert sensitivity(*g2) == pytest.approx(
        sensitivity(*facs) + sensitivity(*[2 * f for f in facs]), rel=1e-12)


def test_balance_is_optimal_and_keeps_the_tensor():
    A, B, C, E = randn(6, 4, seed=1) * 30, randn(5, 4, seed=2) / 10, randn(3, 4, seed=3), randn(2, 4, seed=4)
    bal = balance(A, B, C, E)
    K0 = torch.einsum("ar,br,cr,dr->abcd", A, B, C, E)
    assert torch.allclose(torch.einsum("ar,br,cr,dr->abcd", *bal), K0, rtol=1e-12, atol=1e-12)
    s_bal = sensitivity(*bal)
    assert s_bal < sensitivity(A, B, C, E)
    for i in range(20):     # random rescalings of the balanced terms (product 1) never help
        lg = 0.3 * randn(4, 4, seed=50 + i)
        lg = lg - lg.mean(0, keepdim=True)
        f = [F * torch.exp(lg[n]) for n, F in enumerate(bal)]
        assert sensitivity(*f) >= s_bal * (1 - 1e-12)
    # a zero column removes the whole (null) term
    B0 = B.clone()
    B0[:, 1] = 0
    bz = balance(A, B0, C)
    assert all(float(F[:, 1].abs().max()) == 0 for F in bz[:3]) and bz[3] is None


# ----------------------------------------------------------------------------- subproblem


@pytest.mark.parametrize("case", ["active", "zero", "singular"])
def test_ellipsoid_subproblem_matches_scipy(case):
    m, n = 2, 4
    d = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)
    Q = randn(n, n, seed=7)
    N = Q @ Q.T + 0.1 * torch.eye(n, dtype=F64)
    if case == "singular":
        N = Q[:, :2] @ Q[:, :2].T
    X0 = randn(m, n, seed=8)
    g = 0.3 * randn(m, n, seed=9)
    if case == "singular":      # a least-squares model: g in the range of N
        g = g @ N
    c0 = 1.0

    def qf(X):
        Dx = X - X0
        return c0 - 2 * float((g * Dx).sum()) + float(((Dx @ N) * Dx).sum())

    q0 = qf(torch.zeros_like(X0))
    # the bound lies between the unconstrained minimum and q(0), or above q(0) ("zero")
    Xmin = X0 + torch.linalg.lstsq(N, g.T).solution.T
    qmin = qf(Xmin)
    bound = q0 + 1.0 if case == "zero" else qmin + 0.3 * (min(c0, q0) - qmin)
    X, qv, mu, feas = ellipsoid_least_norm(d, N, X0, g, c0, bound)
    assert feas and qv <= bound + 1e-12 * abs(bound) and qf(X) == pytest.approx(qv, rel=1e-9, abs=1e-12)
    obj = float((d * X ** 2).sum())
    if case == "zero":
        assert obj == 0.0
        return
    assert qv == pytest.approx(bound, rel=1e-9)        # the constraint is active
    dn, Nn, X0n, gn = d.numpy(), N.numpy(), X0.numpy(), g.numpy()

    def f(x):
        return float((dn * x.reshape(m, n) ** 2).sum())

    def con(x):
        Dx = x.reshape(m, n) - X0n
        return bound - (c0 - 2 * (gn * Dx).sum() + ((Dx @ Nn) * Dx).sum())

    best = None
    for x0 in (X0n.ravel(), Xmin.numpy().ravel(), np.zeros(m * n)):
        r = scipy.optimize.minimize(f, x0, method="SLSQP",
                                    constraints=[{"type": "ineq", "fun": con}],
                                    options={"ftol": 1e-14, "maxiter": 1000})
        if con(r.x) >= -1e-9 and (best is None or r.fun < best.fun):
            best = r
    assert obj == pytest.approx(best.fun, rel=1e-6)
    assert obj <= best.fun * (1 + 1e-8)
    if case == "active":    # strictly convex: unique solution
        assert np.allclose(X.numpy().ravel(), best.x, atol=1e-5)


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feasible_every_sweep_and_sensitivity_non_increasing(seed):
    T, S, k, R = 6, 5, 3, 5
    K = randn(T, S, k, k, seed=seed)
    Sg = aniso_sigma(S * k * k, seed=seed)
    init = cp_als(K, Sg, R, max_iter=15, dtype=F64, seed=seed)
    res = stable_cp(K, Sg, R, init=init, max_sweeps=25, dtype=F64)
    assert isinstance(res, StableCPResult) and len(res.sensitivity_history) == res.n_iter + 1
    base = base_of(K, Sg)
    check_run(res, K, Sg, base)
    assert res.delta ** 2 == pytest.approx(init.rel_error * base, rel=1e-6)
    assert res.sensitivity_after < res.sensitivity_before
    assert res.sensitivity_before <= sensitivity(init.A, init.B, init.C) * (1 + 1e-12)


@pytest.mark.parametrize("sigma", ["frobenius", "sigma"])
def test_planted_degenerate_cp_gets_10x_lower_sensitivity(sigma):
    K, init = planted_degenerate()
    Sg = None if sigma == "frobenius" else aniso_sigma(K[0].numel(), cond=1e2)
    base = base_of(K, Sg)
    d2 = abs_err(K, init.kernel(), Sg)
    res = stable_cp(K, Sg, 5, init=init, max_sweeps=80, dtype=F64)
    check_run(res, K, Sg, base)
    assert res.delta ** 2 == pytest.approx(d2, rel=1e-9)
    raw = sensitivity(init.A, init.B, init.C)
    # >= 10x below even the optimally rescaled degenerate start (and far below the raw one)
    assert res.sensitivity_after * 10 <= res.sensitivity_before <= raw
    assert res.sensitivity_after * 100 <= raw
    # at the same error: the error stays at the start's level (within the bound)
    assert res.rel_error * base <= d2 * (1 + 1e-6)
    norms = [float(F.norm(dim=0).max()) for F in (res.A, res.B, res.C)]
    assert max(norms) < 0.1 * float(init.A.norm(dim=0).max())


def test_sigma_identity_equals_frobenius_path():
    K = randn(5, 4, 3, 3, seed=3)
    init = cp_als(K, None, 4, max_iter=10, dtype=F64)
    a = stable_cp(K, None, 4, init=init, max_sweeps=8, dtype=F64)
    b = stable_cp(K, torch.eye(36, dtype=F64), 4, init=init, max_sweeps=8, dtype=F64)
    assert np.allclose(a.sensitivity_history, b.sensitivity_history, rtol=1e-7)
    assert torch.allclose(a.kernel(), b.kernel(), atol=1e-8)


def test_row_blocks_cp4_and_larger_delta():
    # direct_max < n_k R forces the block path for B; cp4 layout; a looser delta
    T, S, R = 6, 6, 4
    K = randn(T, S, 3, 3, seed=4)
    Sg = aniso_sigma(S * 9, seed=4)
    init = cp_als(K, Sg, R, layout="cp4", max_iter=10, dtype=F64)
    base = base_of(K, Sg)
    d = math.sqrt(1.2 * init.rel_error * base)
    res = stable_cp(K, Sg, R, layout="cp4", init=init, delta=d, max_sweeps=10, direct_max=8,
                    dtype=F64)
    assert res.E is not None and res.E.shape == (3, R)
    check_run(res, K, Sg, base)
    assert res.delta == pytest.approx(d)
    assert res.rel_error > init.rel_error       # the extra error budget is used
    full = stable_cp(K, Sg, R, layout="cp4", init=init, delta=d, max_sweeps=10, dtype=F64)
    check_run(full, K, Sg, base)


def test_default_init_runs_cp_als():
    K = randn(6, 4, 3, 3, seed=5)
    Sg = aniso_sigma(36, seed=5)
    res = stable_cp(K, Sg, 4, max_sweeps=5, cp_options=dict(max_iter=10), name="l")
    ref = cp_als(K, Sg, 4, max_iter=10, name="l")
    assert res.init_rel_error == pytest.approx(ref.rel_error, rel=1e-5)
    assert res.A.dtype == torch.float32
    check_run(res, K, Sg, base_of(K, Sg))


def test_grouped_equals_separate():
    g, T, S, R = 2, 8, 3, 3
    K = randn(T, S, 3, 3, seed=6)
    Sg = torch.stack([aniso_sigma(S * 9, seed=10), aniso_sigma(S * 9, seed=11)])
    init = cp_als(K, Sg, R, max_iter=8, dtype=F64)
    res = stable_cp(K, Sg, R, init=init, max_sweeps=6, dtype=F64)
    assert res.groups == 2 and res.A.shape == (2, T // g, R) and res.B.shape == (2, S, R)
    ss = 0.0
    for i in range(g):
        one = CPResult("cp3", init.A[i], init.B[i], init.C[i], None, (3, 3), rel_error=0.0)
        r = stable_cp(K[i * 4:(i + 1) * 4], Sg[i], R, init=one, max_sweeps=6, dtype=F64)
        assert torch.allclose(res.kernel()[i], r.kernel(), atol=1e-10)
        ss += r.sensitivity_after
    assert res.sensitivity_after == pytest.approx(ss, rel=1e-10)
    base = sum(base_of(K[i * 4:(i + 1) * 4], Sg[i]) for i in range(g))
    assert res.history[-1] * base <= res.delta ** 2 * (1 + 1e-6)


def test_errors_name_the_layer():
    K = randn(4, 3, 3, 3, seed=7)
    bad = K.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="conv7"):
        stable_cp(bad, None, 3, name="conv7")
    Sg = torch.eye(27, dtype=F64)
    Sg[1, 1] = float("inf")
    with pytest.raises(NumericalError, match="conv7"):
        stable_cp(K, Sg, 3, name="conv7")
    init = cp_als(K, None, 3, max_iter=5, dtype=F64)
    nan_init = CPResult("cp3", init.A * float("nan"), init.B, init.C, None, (3, 3), rel_error=0.0)
    with pytest.raises(NumericalError, match="conv7"):
        stable_cp(K, None, 3, init=nan_init, name="conv7")
    with pytest.raises(InputError, match="conv7"):
        stable_cp(K, None, 3, init=init, delta=0.5 * math.sqrt(init.rel_error * base_of(K, None)),
                  name="conv7")
    with pytest.raises(InputError, match="layout"):
        stable_cp(K, None, 3, init=init, layout="cp4", name="conv7")
    with pytest.raises(InputError, match="rank"):
        stable_cp(K, None, 4, init=init, name="conv7")


# ----------------------------------------------------------------------------- row updates (wide layers)


@pytest.mark.parametrize("rows", ["majorize", "exact", "block"])
def test_row_paths_feasible_monotone_and_reduce(rows):
    # direct_max below n_k R for both input factors forces the row-wise updates
    T, S, k, R = 10, 12, 3, 6
    K = randn(T, S, k, k, seed=11)
    Sg = aniso_sigma(S * k * k, seed=11)
    init = cp_als(K, Sg, R, max_iter=15, dtype=F64, seed=1)
    base = base_of(K, Sg)
    res = stable_cp(K, Sg, R, init=init, max_sweeps=12, direct_max=2 * R, rows=rows, exact_rows=0,
                    dtype=F64)
    check_run(res, K, Sg, base)
    assert res.delta ** 2 == pytest.approx(init.rel_error * base, rel=1e-6)
    assert res.sensitivity_after < 0.95 * res.sensitivity_before


def test_majorizer_dominates_the_diagonal_blocks():
    S, k = 7, 3
    D = S * k * k
    Sg = aniso_sigma(D, cond=1e4, seed=3)
    Sg[:, 9:18] = 0         # a dead channel: alpha = 0
    Sg[9:18, :] = 0
    G = _Group(randn(4, D, seed=1), Sg, (S, k * k), 1.0, 8, "majorize", 0, None)
    for mode in range(2):
        Sbar, alpha = G.majorizer(mode)
        idx = G.idx[mode]
        for i in range(idx.shape[0]):
            blk = Sg[idx[i]][:, idx[i]]
            gap = torch.linalg.eigvalsh(alpha[i] * Sbar - blk)
            assert float(gap.min()) >= -1e-12 * float(torch.linalg.eigvalsh(blk).max().clamp_min(1e-300))
    assert float(G.majorizer(0)[1][1]) == 0.0
    # the solver on it: the dead channel's row of B carries no error and goes to zero
    K = randn(6, S, k, k, seed=13)
    init = cp_als(K, Sg, 4, max_iter=10, dtype=F64)
    res = stable_cp(K, Sg, 4, init=init, max_sweeps=6, direct_max=8, rows="majorize",
                    exact_rows=0, dtype=F64)
    check_run(res, K, Sg, base_of(K, Sg))
    assert float(res.B[1].abs().max()) == 0.0


def test_secular_newton_warm_starts_agree():
    g = torch.Generator().manual_seed(5)
    n = 40
    lam = torch.rand(n, generator=g, dtype=F64) ** 3
    lam[:3] = 0                                  # null directions
    h = torch.randn(n, generator=g, dtype=F64)
    h[:3] = 0
    w0 = torch.randn(n, generator=g, dtype=F64)
    c0 = 1.0
    H2, HW, W2 = (h * h).numpy(), (h * w0).numpy(), (w0 * w0).numpy()
    q0 = c0 + float((2 * HW + lam.numpy() * W2).sum())
    qinf = c0 - float((H2[3:] / lam.numpy()[3:]).sum())
    for frac in (0.999, 0.5, 1e-3):
        bound = qinf + frac * (q0 - qinf)
        mus = [_secular(lam.numpy(), H2, HW, W2, c0, bound, mu0)[:2] for mu0 in (None, 1e-6, 1.0, 1e6)]
        for mu, q in mus:
            assert q <= bound + 1e-12 * abs(bound)
            assert q == pytest.approx(bound, rel=1e-9, abs=1e-12 * (q0 - qinf))
            assert mu == pytest.approx(mus[0][0], rel=1e-6)
    # bound above q(0): mu = 0; below the unconstrained minimum: infeasible
    assert _secular(lam.numpy(), H2, HW, W2, c0, q0 + 1.0)[0] == 0.0
    assert _secular(lam.numpy(), H2, HW, W2, c0, qinf - 1.0)[2] is False


def test_planted_degenerate_with_majorised_rows():
    K, init = planted_degenerate(T=8, S=10, R0=3)
    Sg = aniso_sigma(K[0].numel(), cond=1e2)
    base = base_of(K, Sg)
    res = stable_cp(K, Sg, 5, init=init, max_sweeps=80, direct_max=10, rows="majorize",
                    exact_rows=0, dtype=F64)
    check_run(res, K, Sg, base)
    assert res.sensitivity_after * 10 <= res.sensitivity_before


def test_max_gflop_caps_the_sweeps_and_extrapolation_off():
    K = randn(6, 5, 3, 3, seed=12)
    Sg = aniso_sigma(45, seed=12)
    init = cp_als(K, Sg, 5, max_iter=10, dtype=F64)
    base = base_of(K, Sg)
    capped = stable_cp(K, Sg, 5, init=init, max_sweeps=50, tol=0.0, max_gflop=1e-9, dtype=F64)
    assert capped.n_iter == 3 and not capped.converged
    check_run(capped, K, Sg, base)
    plain = stable_cp(K, Sg, 5, init=init, max_sweeps=6, extrapolate=False, rows="exact",
                      direct_max=5, dtype=F64)
    check_run(plain, K, Sg, base)
    with pytest.raises(InputError, match="rows"):
        stable_cp(K, Sg, 5, init=init, rows="fast")


def test_exact_fit_depthwise_groups():
    # one output channel per group: the CP start is exact (delta ~ 0); rounding must not make
    # the solver reject or revert anything, and the error stays at rounding level
    g = 6
    K = randn(g, 1, 3, 3, seed=14)
    X = randn(g, 50, 9, seed=15)
    Sg = torch.einsum("gni,gnj->gij", X, X) / 50
    init = cp_als(K, Sg, 2, max_iter=10, groups=g, dtype=F64)
    res = stable_cp(K, Sg, 2, init=init, max_sweeps=5, dtype=F64)
    base = sum(base_of(K[i:i + 1], Sg[i]) for i in range(g))
    assert res.rel_error < 1e-12
    assert res.sensitivity_after <= res.sensitivity_before * (1 + 1e-12)
    assert abs_err(K, res.kernel().reshape(K.shape), None) < 1e-10 * base


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("layout", ["cp3", "cp4"])
def test_rescale_removes_output_shrinkage_and_keeps_the_bound(layout):
    """Minimising ss shrinks the layer's output at a fixed error; the final per-channel
    least-squares scale undoes that: afterwards every channel's best scale is 1, the error is
    no larger than without it (so still <= delta) and the output energy is larger."""
    T, S, k, R = 8, 6, 3, 6
    K = randn(T, S, k, k, seed=3)
    Sg = aniso_sigma(S * k * k, seed=3)
    init = cp_als(K, Sg, R, layout=layout, max_iter=20, dtype=F64, seed=3)
    plain = stable_cp(K, Sg, R, layout=layout, init=init, max_sweeps=30, dtype=F64, finish="none")
    scaled = stable_cp(K, Sg, R, layout=layout, init=init, max_sweeps=30, dtype=F64)
    W = K.reshape(T, -1)

    def alpha(res):
        A = res.kernel().reshape(T, -1).double()
        return ((W @ Sg) * A).sum(1) / ((A @ Sg) * A).sum(1)

    def energy(res):
        A = res.kernel().reshape(T, -1).double()
        return float(((A @ Sg) * A).sum())

    assert float(alpha(plain).min()) > 1 + 1e-4  # the shrinkage being fixed
    torch.testing.assert_close(alpha(scaled), torch.ones(T, dtype=F64), rtol=0, atol=1e-9)
    base = base_of(K, Sg)
    assert abs_err(K, scaled.kernel(), Sg) <= abs_err(K, plain.kernel(), Sg) * (1 + 1e-12)
    assert abs_err(K, scaled.kernel(), Sg) <= scaled.delta ** 2 * (1 + 1e-6) + 1e-14 * base
    assert energy(scaled) > energy(plain)
    assert scaled.sensitivity_after < scaled.sensitivity_before


@pytest.mark.parametrize("layout", ["cp3", "cp4"])
def test_refit_finish_is_the_least_squares_output_factor(layout):
    """finish='refit': A is the least-squares output factor for the stable input factors (the
    gradient (W - A M^T) Sigma M vanishes), so the error is no larger than the channel rescale's
    (a special case) nor the CPD-EPC point's, and the factors are balanced (ss cannot fall by
    rescaling rank-one terms)."""
    T, S, k, R = 8, 6, 3, 6
    K = randn(T, S, k, k, seed=4)
    Sg = aniso_sigma(S * k * k, seed=4)
    init = cp_als(K, Sg, R, layout=layout, max_iter=20, dtype=F64, seed=4)
    runs = {f: stable_cp(K, Sg, R, layout=layout, init=init, max_sweeps=30, dtype=F64, finish=f)
            for f in ("none", "channel", "refit")}
    res = runs["refit"]
    W = K.reshape(T, -1).double()
    facs = [res.A, res.B, res.C] + ([res.E] if layout == "cp4" else [])
    M = khatri_rao([F.double() for F in facs[1:]])
    A = res.A.double()
    grad = (W - A @ M.T) @ Sg @ M
    assert float(grad.abs().max()) < 1e-9 * float((W @ Sg @ M).abs().max())
    e = {f: abs_err(K, r.kernel(), Sg) for f, r in runs.items()}
    assert e["refit"] <= e["channel"] * (1 + 1e-12) and e["channel"] <= e["none"] * (1 + 1e-12)
    assert e["none"] <= runs["none"].delta ** 2 * (1 + 1e-6) + 1e-14 * base_of(K, Sg)
    assert e["refit"] < e["none"] * (1 - 1e-6)  # the refit does move something here
    torch.testing.assert_close(torch.tensor(sensitivity(*balance(*facs))), torch.tensor(res.sensitivity_after),
                               rtol=1e-9, atol=0)
    assert res.sensitivity_after < res.sensitivity_before
    with pytest.raises(InputError, match="finish"):
        stable_cp(K, Sg, R, layout=layout, init=init, finish="rescale")
