"""Solver numerics: the reported error is the error of the returned factors, the history is the
running best in that exact measure, float32 and float64 inputs give the same fit, one damping
rule, and the fit diagnostics (norm ratio, identity error) in every result.

Every error here is recomputed independently of the solvers: ``W~`` is rebuilt in float64 from
the returned factors and ``trace((W - W~) S (W - W~)^T) / trace(W S W^T)`` is evaluated with
``S = Sigma + damping * mean(diag(Sigma)) * I`` (the solver's objective).  Sigma is the
uncentred second moment of 36 activation patches of dimension 72: singular (rank <= 36) and
strongly anisotropic, the regime where float32 bookkeeping of the error terms goes wrong.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ddtd.solvers import cp_als, lowrank_sparse, sigma_svd, stable_cp, tucker2
from synthetic import activation_patches

F64 = torch.float64
F32 = torch.float32
SEEDS = range(5)
#: relative agreement required between the reported and the recomputed error
EXACT = 1e-6
#: relative slack allowed for a history to be non-increasing
SLACK = 1e-12
#: float32 against float64 inputs: relative difference of the errors, and of the fits
#: (``||W~_32 - W~_64||_S / ||W||_S``), at the default damping
AGREE_ERR = 1e-4
AGREE_FIT = 3e-4

T, S_, K = 12, 8, 3
D = S_ * K * K


def problem(seed: int):
    """``(W (T, S, 3, 3), Sigma (D, D))`` in float64; Sigma from 36 activation patches."""
    X = activation_patches(S_, K, n_images=1, size=6, seed=seed, dtype=F64)
    sigma = X.T @ X / X.shape[0]
    g = torch.Generator().manual_seed(1000 + seed)
    W = torch.randn(T, S_, K, K, generator=g, dtype=F64)
    return W, 0.5 * (sigma + sigma.T)


def objective(sigma: torch.Tensor, damping: float) -> torch.Tensor:
    s = sigma.to(F64)
    s = 0.5 * (s + s.T)
    return s + damping * float(torch.diagonal(s).mean()) * torch.eye(s.shape[0], dtype=F64)


def true_rel(W: torch.Tensor, What: torch.Tensor, s: torch.Tensor) -> float:
    W = W.reshape(W.shape[0], -1).to(F64)
    dW = W - What.reshape(W.shape).to(F64)
    return float(torch.trace(dW @ s @ dW.T) / torch.trace(W @ s @ W.T))


def rebuild(res) -> torch.Tensor:
    """``W~ (T, D)`` in float64 from the returned factors (no method of the result is used)."""
    name = type(res).__name__
    if name == "SVDResult":
        return res.A.to(F64) @ res.B.to(F64)
    if name == "Tucker2Result":
        return torch.einsum("ta,abij,sb->tsij", res.U.to(F64), res.core.to(F64),
                            res.V.to(F64)).reshape(res.U.shape[0], -1)
    if name in ("CPResult", "StableCPResult"):
        A, B, C = (x.to(F64) for x in (res.A, res.B, res.C))
        if res.layout == "cp3":
            K3 = torch.einsum("tr,sr,pr->tsp", A, B, C)
        else:
            K3 = torch.einsum("tr,sr,ir,jr->tsij", A, B, C, res.E.to(F64))
        return K3.reshape(A.shape[0], -1)
    if name == "LRSResult":
        A, B = (x.to(F64) for x in res.factors)
        L = A @ B
        idx, vals = res.indices, res.values.to(F64)
        out = L.clone()
        if res.mode == "additive":
            out[idx[:, 0], idx[:, 1]] += vals
        else:
            out[idx[:, 0], idx[:, 1]] = vals
        return out
    raise AssertionError(name)


SOLVERS = {
    "svd": lambda W, s, **kw: sigma_svd(W, s, 4, **kw),
    "tucker2": lambda W, s, **kw: tucker2(W, s, (4, 4), max_iter=25, tol=1e-7, **kw),
    "cp3": lambda W, s, **kw: cp_als(W, s, 6, layout="cp3", max_iter=25, tol=1e-7, **kw),
    "cp4": lambda W, s, **kw: cp_als(W, s, 6, layout="cp4", max_iter=25, tol=1e-7, **kw),
    "cp3-cg": lambda W, s, **kw: cp_als(W, s, 6, layout="cp3", max_iter=25, tol=1e-7,
                                        direct_max=1, **kw),
    "stable-cp3": lambda W, s, **kw: stable_cp(W, s, 6, layout="cp3", max_sweeps=8,
                                               cp_options={"max_iter": 15}, **kw),
    "lrs": lambda W, s, **kw: lowrank_sparse(W, s, 2, 40, init="data", max_iter=8, **kw),
    "lrs-masking": lambda W, s, **kw: lowrank_sparse(W, s, 2, 40, init="masked", mode="masking",
                                                     max_iter=8, **kw),
}

#: (input dtype, compute dtype passed to the solver)
CASES = [(F32, None), (F64, F64), (F64, None)]


def _check_exact(fmt, res, W, s_obj, where):
    e = true_rel(W, rebuild(res), s_obj)
    h = list(res.history)
    assert h, where
    assert abs(h[-1] - e) <= EXACT * e, (where, "history[-1]", h[-1], "true", e)
    assert abs(res.rel_error - e) <= EXACT * e, (where, "rel_error", res.rel_error, "true", e)
    if fmt.startswith("stable"):
        # the error of stable CP rises toward the bound while the sensitivity falls
        ss = list(res.sensitivity_history)
        assert all(b <= a * (1 + SLACK) for a, b in zip(ss, ss[1:])), (where, ss)
        Wm = W.reshape(T, -1).to(F64)
        bound = res.delta ** 2 / float(torch.trace(Wm @ s_obj @ Wm.T))
        assert all(x <= bound * (1 + 1e-6) for x in h), (where, h, bound)
    else:
        assert all(b <= a * (1 + SLACK) for a, b in zip(h, h[1:])), (where, h)


@pytest.mark.parametrize("fmt", list(SOLVERS))
def test_reported_error_is_the_error_of_the_returned_factors(fmt):
    """Last history entry == rel_error == the recomputed error (1e-6 relative); the history is
    non-increasing (1e-12 relative slack); float32 / float64 inputs and compute dtypes; the
    default damping and none (the bare, singular Sigma)."""
    for seed in SEEDS:
        W64, sig64 = problem(seed)
        for damping in (1e-3, 0.0):
            for in_dt, dt in CASES:
                W, sig = W64.to(in_dt), sig64.to(in_dt)
                res = SOLVERS[fmt](W, sig, damping=damping, dtype=dt)
                where = (fmt, seed, damping, in_dt, dt)
                _check_exact(fmt, res, W, objective(sig, damping), where)


@pytest.mark.parametrize("fmt", ["tucker2", "cp3", "cp4"])
def test_frobenius_reported_error_is_exact(fmt):
    for seed in SEEDS:
        W64, _ = problem(seed)
        for in_dt, dt in CASES[:2]:
            W = W64.to(in_dt)
            res = SOLVERS[fmt](W, None, dtype=dt)
            _check_exact(fmt, res, W, torch.eye(D, dtype=F64), (fmt, seed, in_dt, dt))


@pytest.mark.parametrize("fmt", list(SOLVERS))
def test_float32_and_float64_inputs_agree(fmt):
    """At the default damping: errors within ``AGREE_ERR`` relative, fits within ``AGREE_FIT``
    (relative Sigma norm of their difference)."""
    for seed in SEEDS:
        W64, sig64 = problem(seed)
        s_obj = objective(sig64, 1e-3)
        r64 = SOLVERS[fmt](W64, sig64, damping=1e-3, dtype=F64)
        r32 = SOLVERS[fmt](W64.float(), sig64.float(), damping=1e-3)
        e64, e32 = true_rel(W64, rebuild(r64), s_obj), true_rel(W64, rebuild(r32), s_obj)
        assert abs(e32 - e64) <= AGREE_ERR * e64, (fmt, seed, e32, e64)
        d = rebuild(r32) - rebuild(r64)
        Wm = W64.reshape(T, -1)
        gap = math.sqrt(float(torch.trace(d @ s_obj @ d.T) / torch.trace(Wm @ s_obj @ Wm.T)))
        assert gap <= AGREE_FIT, (fmt, seed, gap)


def test_tucker2_float32_keeps_its_best_iterate():
    """The returned factors are the best iterate in the exact measure: no iterate the solver
    reports (raw_history) is better than what it returns."""
    for seed in SEEDS:
        W64, sig64 = problem(seed)
        for damping in (1e-3, 0.0):
            res = tucker2(W64.float(), sig64.float(), (4, 4), max_iter=25, tol=0, damping=damping)
            e = true_rel(W64.float(), rebuild(res), objective(sig64.float(), damping))
            assert e <= min(res.raw_history) * (1 + EXACT), (seed, damping, e, res.raw_history)


# ----------------------------------------------------------------------------- damping rule


def test_one_damping_rule():
    from ddtd.methods import METHODS
    from ddtd.solvers import DAMPING, default_damping
    from ddtd.solvers import lrs as L

    assert default_damping("svd") == 0.0 == METHODS["svd"].config().damping_for()
    for m in ("tucker2", "cp3", "cp4", "cp3-stable", "lrs", "sparse"):
        assert default_damping(m) == DAMPING == METHODS[m].config().damping_for()
    for fn, method in ((sigma_svd, "svd"), (tucker2, "tucker2"), (cp_als, "cp3"),
                       (stable_cp, "cp3-stable"), (lowrank_sparse, "lrs"),
                       (L.sigma_prune, "sparse")):
        assert inspect.signature(fn).parameters["damping"].default == default_damping(method), fn
        doc = inspect.getdoc(fn)
        assert "damping" in doc and ("DAMPING" in doc or "default_damping" in doc), fn


def test_default_damping_is_applied():
    W64, sig64 = problem(0)
    for fmt in ("tucker2", "cp3", "lrs"):
        a = SOLVERS[fmt](W64, sig64, dtype=F64)
        b = SOLVERS[fmt](W64, sig64, dtype=F64, damping=1e-3)
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-12), fmt
        assert a.info["damping"] == 1e-3


# ----------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("fmt", list(SOLVERS))
def test_info_has_norm_ratio_and_identity_error(fmt):
    from ddtd.solvers import fit_diagnostics

    W64, sig64 = problem(1)
    res = SOLVERS[fmt](W64, sig64, dtype=F64)
    What = rebuild(res)
    Wm = W64.reshape(T, -1)
    assert res.info["norm_ratio"] == pytest.approx(float(What.norm() / Wm.norm()), rel=1e-9)
    assert res.info["identity_error"] == pytest.approx(float((Wm - What).norm() / Wm.norm()),
                                                       rel=1e-9)
    diag = fit_diagnostics(W64, What, sig64)
    assert diag["norm_ratio"] == pytest.approx(res.info["norm_ratio"], rel=1e-9)
    assert diag["sigma_error"] == pytest.approx(true_rel(W64, What, sig64), rel=1e-9)


def test_undamped_growth_is_reported_and_warned():
    """The bare solver on a singular Sigma may grow the weights along directions the data never
    excites; the info says so and the warning helper fires above the threshold."""
    from ddtd.solvers import NORM_GROWTH_WARN, norm_growth_warning

    assert norm_growth_warning({"norm_ratio": NORM_GROWTH_WARN * 1.01}, name="conv") is not None
    assert "conv" in norm_growth_warning({"norm_ratio": NORM_GROWTH_WARN * 1.01}, name="conv")
    assert norm_growth_warning({"norm_ratio": 1.0}) is None
    assert norm_growth_warning({}) is None
    ratios = {}
    for damping in (0.0, 1e-3):
        W64, sig64 = problem(2)
        res = cp_als(W64, sig64, 10, layout="cp3", max_iter=40, tol=0, damping=damping,
                     dtype=F64)
        ratios[damping] = res.info["norm_ratio"]
    assert ratios[1e-3] < ratios[0.0]
    assert ratios[1e-3] < NORM_GROWTH_WARN


def test_report_shows_norm_ratio_and_flags_growth():
    from ddtd.report import LayerReport, Report
    from ddtd.report import format_report

    rep = Report(layers=[
        LayerReport("a", "Conv2d", "tucker2", (4, 4), 100, 50, 1000, 500, 0.1, 0.2, 0.1,
                    info={"norm_ratio": 0.97}),
        LayerReport("b", "Conv2d", "cp3", 6, 100, 50, 1000, 500, 0.1, 0.2, 0.1,
                    info={"norm_ratio": 7.5}),
        LayerReport("c", "Linear", "svd", 3, 100, 50, 1000, 500, 0.1, 0.2, 0.1),
    ])
    text = format_report(rep)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln and ln.split()[0] in "abc"}
    assert "0.97" in lines["a"] and "!" not in lines["a"]
    assert "7.50" in lines["b"] and "!" in lines["b"]
    assert "|W~|/|W|" in text
    warn = [ln for ln in text.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "'b'" in warn[0] and "7.5x" in warn[0]


pytestmark = pytest.mark.usefixtures("single_thread")
