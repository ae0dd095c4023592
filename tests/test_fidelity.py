"""Output sensitivities, Sigma-SVD probes, the ratio search and fidelity targets."""

import math

import pytest
import torch

from ddtd.config import CalibrationConfig, config_from_options
from ddtd.selection import layer_filter
from torch import nn

import ddtd
from ddtd.calibration import calibrate
from ddtd.fidelity import Fidelity, HeldOut, SvdProbe, search_ratio
from ddtd.sensitivity import output_sensitivity
from ddtd.solvers import sigma_svd


def test_gauss_newton_weights_of_a_linear_chain(single_thread):
    """Non-classifier output (one output per input): d_l[c] = E (J_l^T v)_c^2 = ||J_l[:, c]||^2
    for a linear chain (J of the first layer's output is A2, of the last layer's is I)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1)).double()
    x = torch.randn(20000, 6, dtype=torch.float64)
    d = output_sensitivity(net, list(x.split(1000)), ["0", "1"], seed=3)
    A2 = net[1].weight.detach()
    torch.testing.assert_close(d["0"], A2.pow(2).sum(0), rtol=0.04, atol=0)
    torch.testing.assert_close(d["1"], torch.ones(1, dtype=torch.float64), rtol=0.04, atol=0)


def test_fisher_weights_of_the_logits_are_the_class_variances(single_thread):
    """Classifier output: for the logits, g = p - onehot(y) with y ~ p, so E g_c^2 = E p_c (1 - p_c)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.randn(8000, 4, dtype=torch.float64)
    d = output_sensitivity(net, list(x.split(500)), ["0"], seed=1)
    with torch.no_grad():
        p = torch.softmax(net(x), 1)
    torch.testing.assert_close(d["0"], (p * (1 - p)).mean(0), rtol=0.04, atol=0)
    assert all(q.requires_grad for q in net.parameters())  # left as it was


def test_output_weighted_fit_minimises_the_weighted_objective(single_thread):
    """fitting.solve with out_weights: the svd fit equals the closed form S^-1 U_r U_r^T S W and
    beats the unweighted fit in the weighted objective (and loses in the unweighted one)."""
    from ddtd.fitting import LayerData, solve
    from ddtd.methods import SvdConfig

    torch.manual_seed(0)
    layer = nn.Linear(12, 10).double()
    x = torch.randn(500, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    sig = torch.cov(x.T)[None]
    d = torch.rand(10, dtype=torch.float64) ** 4 + 1e-3
    plain = solve(layer, SvdConfig(), 3, LayerData(sig, x.mean(0)[None]), name="l")
    weighted = solve(layer, SvdConfig(), 3, LayerData(sig, x.mean(0)[None], out_weights=d), name="l")
    W = layer.weight.detach()
    s = d.sqrt()[:, None]
    ev, U = torch.linalg.eigh((s * W) @ sig[0] @ (s * W).T)
    Ur = U[:, -3:]
    want = (Ur @ Ur.T @ (s * W)) / s
    from ddtd.fitting import dense_weight

    torch.testing.assert_close(dense_weight(layer, "svd", weighted.factors).double(), want, rtol=1e-4, atol=1e-6)

    def werr(out):
        E = (W - dense_weight(layer, "svd", out.factors).double()) * s
        return float(torch.trace(E @ sig[0] @ E.T))

    assert werr(weighted) < werr(plain) * (1 - 1e-3)
    assert weighted.sigma_error > plain.sigma_error
    assert weighted.info["weighted_error"] == pytest.approx(werr(weighted) / float(torch.trace(
        (s * W) @ sig[0] @ (s * W).T)), rel=1e-6)


def test_svd_probe_equals_the_sigma_svd_solver(single_thread):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
    x = torch.randn(32, 3, 10, 10)
    moments = calibrate(net, x, CalibrationConfig(show_progress=False)).moments
    probe = SvdProbe(net, moments, ["2"])
    for r in (1, 3, 7):
        Wt, shift = probe.truncated("2", r)
        fit = sigma_svd(net[2].weight.detach().double(), moments["2"].covariance()[0], r)
        torch.testing.assert_close(Wt.reshape(12, -1), (fit.A @ fit.B).to(Wt), rtol=1e-6, atol=1e-8)
    # the dense probe model computes what the bias-corrected truncation predicts
    m = probe.model_at({"2": 4})
    Wt, shift = probe.truncated("2", 4)
    with torch.no_grad():
        h = torch.relu(net[0](x))
        want = torch.nn.functional.conv2d(h, Wt.float(), net[2].bias + shift.float(), padding=1)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_search_ratio_brackets_then_bisects():
    calls = []

    def fid(r):
        calls.append(r)
        return Fidelity(agreement=1 - 0.1 * (r - 1), relative_error=0.0, images=10)

    best, curve = search_ratio(fid, min_agreement=0.95, rel_tol=0.01, probes=12)
    assert 1.5 / 1.01 <= best <= 1.5 and len(curve) == len(calls) <= 12
    assert all(c["meets"] == (c["agreement"] >= 0.95) for c in curve)
    best, _ = search_ratio(lambda r: Fidelity(0.5, 1.0, 10), min_agreement=0.95)
    assert best is None
    best, curve = search_ratio(lambda r: None if r > 6 else Fidelity(1.0, 0.0, 10), min_agreement=0.9, probes=12)
    assert 4 <= best <= 6 and any(c.get("note") == "out of reach" for c in curve)


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def test_min_agreement_is_met_on_the_held_out_inputs(single_thread):
    torch.manual_seed(0)
    net = _Classifier().eval()
    x = torch.randn(160, 3, 8, 8)
    res = ddtd.compress(net, x, config_from_options(min_agreement=0.9, method="svd", sequential=False, show_progress=False))
    fid = res.report.fidelity
    assert fid["heldout"]["agreement"] >= 0.9 and fid["heldout"]["images"] == 20
    assert fid["curve"] and res.report.ratio > 1.1
    assert res.report.settings["min_agreement"] == 0.9
    # the held-out inputs are not fitted on: the same split measured from outside
    held = HeldOut(net, [x[torch.randperm(160, generator=torch.Generator().manual_seed(7919))[-20:].sort().values]],
                   "cpu")
    assert held.measure(res.model).agreement == pytest.approx(fid["heldout"]["agreement"])


def test_a_ratio_with_poor_fidelity_warns_with_a_safe_ratio(single_thread, caplog):
    """Isotropic inputs through full-rank layers: 4x destroys the model, and the warning names
    a smaller ratio that the probes found to keep 99% agreement."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(400, 64)
    with caplog.at_level("WARNING", logger="ddtd"):
        res = ddtd.compress(net, x, config_from_options(ratio=4, method="svd", sequential=False, show_progress=False), filter_fn=layer_filter(net, include_first=True))
    fid = res.report.fidelity
    assert fid["heldout"]["agreement"] < 0.9
    assert "POOR FIDELITY" in caplog.text
    safe = fid["safe_ratio_estimate"]
    assert safe is None or 1 < safe < 4
    if safe is not None:
        again = ddtd.compress(net, x, config_from_options(ratio=safe, method="svd", sequential=False, show_progress=False), filter_fn=layer_filter(net, include_first=True))
        assert again.report.fidelity["heldout"]["agreement"] >= 0.99 - 1 / 50


def test_sensitivity_allocation_lowers_the_output_error(single_thread):
    """Two layers alike in their own terms, but the second one's output is amplified 30x on the
    way out: the sensitivity-weighted allocation gives it the budget and the output error falls."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(24, 24)
            self.b = nn.Linear(24, 24)
            self.head = nn.Linear(48, 4)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), 30 * self.b(x)], 1))

    net = Net().eval()
    x = torch.randn(512, 24) @ torch.diag(torch.linspace(0.2, 2, 24))
    errs = {}
    for alloc in ("relative", "sensitivity"):
        res = ddtd.compress(net, x, config_from_options(ratio=1.6, method="svd", allocation=alloc, sequential=False, show_progress=False), filter_fn=layer_filter(net, include_first=True))
        errs[alloc] = res.report.fidelity["heldout"]["relative_error"]
        assert res.report.settings["allocation"] == alloc
    assert errs["sensitivity"] < 0.7 * errs["relative"], errs
    assert math.isfinite(errs["sensitivity"])


def test_default_budget_never_picks_a_format_slower_than_dense(single_thread):
    """--budget both (default): auto never chooses low rank + sparse (it runs as a dense layer)
    and no layer gets more multiply-adds than its original; --budget params (bytes only) may."""
    torch.manual_seed(0)
    net = _Classifier().eval()
    x = torch.randn(64, 3, 8, 8)
    kw = dict(ratio=2.5, method="auto", sequential=False, holdout=0, show_progress=False)
    both = ddtd.compress(net, x, config_from_options(**kw))
    assert both.report.settings["budget"] == "both"
    rows = [r for r in both.report.layers if r.method != "dense"]
    assert rows and all(r.method != "lrs" and r.macs_after <= r.macs_before for r in rows)
    assert both.report.macs_ratio > 1
    from ddtd.planning import plan

    moments = calibrate(net, x, CalibrationConfig(show_progress=False)).moments
    for budget, with_lrs in (("both", False), ("params", True), ("flops", False)):
        p_ = plan(net, moments, config_from_options(ratio=2.5, budget=budget), input_shape=(3, 8, 8))
        cands = [p.candidates for p in p_.active]
        assert cands and all(("lrs" in c) == with_lrs for c in cands), (budget, cands)
