"""Any model input: token ids, dicts with attention masks, tuples, variable sequence lengths,
a forward callable; padding excluded from every statistic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddtd
from ddtd.calibration import calibrate
from ddtd.config import CalibrationConfig, config_from_options
from ddtd.fitting import LayerData, solve
from ddtd.inputs import split_batches
from ddtd.methods import SvdConfig


class TokenEncoder(nn.Module):
    """Embedding + two TransformerEncoderLayers + a mean-pooled head; called as
    ``model(input_ids=..., attention_mask=...)`` like a tokenizer's output."""

    def __init__(self, vocab: int = 40, width: int = 32, classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=~attention_mask.bool())
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _token_batches(n_batches=8, B=6, vocab=40, seed=0):
    """Dict batches of different lengths, each sequence padded at its end (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        L = 5 + 2 * (i % 4)
        ids = torch.randint(1, vocab, (B, L), generator=g)
        lengths = torch.randint(2, L + 1, (B,), generator=g)
        mask = (torch.arange(L)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def test_token_model_calibrates_and_compresses_from_dict_batches(single_thread):
    torch.manual_seed(0)
    model = TokenEncoder().eval()
    batches = _token_batches()
    res = ddtd.compress(model, batches, config_from_options(ratio=1.3, method="svd", sequential=False))
    rows = {r.name: r for r in res.report.layers}
    # the first Linear after the embedding is an ordinary layer; q / k / v are calibrated and fitted
    assert rows["enc.layers.0.self_attn.q_proj"].note != "input layer (few channels, little to gain, sensitive)"
    assert any(r.method == "svd" and "self_attn" in r.name for r in rows.values())
    assert rows["head"].method == "dense"
    assert res.report.macs_before > 0 and res.report.fidelity["holdout_images"] >= 4
    with torch.no_grad():
        out = res.model(**batches[0])  # ids stay integer all the way
    assert out.shape == (6, 4) and torch.isfinite(out).all()


def test_masked_statistics_equal_the_unmasked_tokens():
    """Sigma, mean and count of a Linear layer on (B, L, d) inputs cover the unmasked tokens
    only (float64, 1e-10), across batches of different lengths."""
    torch.manual_seed(0)

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).double()

        def forward(self, x, attention_mask):
            return self.lin(x)

    batches, rows = [], []
    for L in (4, 7, 5):
        x = torch.randn(3, L, 6, dtype=torch.float64)
        mask = torch.rand(3, L) > 0.3
        mask[:, 0] = True
        batches.append({"x": x, "attention_mask": mask})
        rows.append(x[mask])
    lm = calibrate(Proj().eval(), batches, CalibrationConfig(show_progress=False)).moments["lin"]
    X = torch.cat(rows)
    assert lm.count == len(X)
    torch.testing.assert_close(lm.x_sum[0], X.sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lm.xxT[0], X.T @ X, rtol=1e-10, atol=1e-10)
    # a mask callable says the same for batches without an attention_mask key
    plain = [(b["x"], b["attention_mask"]) for b in batches]
    lm2 = calibrate(Proj().eval(), plain, CalibrationConfig(show_progress=False, mask=lambda b: b[1])).moments["lin"]
    torch.testing.assert_close(lm2.xxT, lm.xxT, rtol=1e-12, atol=1e-12)


def test_identity_holds_with_masks():
    """The reported Sigma error equals the measured mean output error over the unmasked tokens."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 8).double()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x, attention_mask):
            return self.lin(x)

    batches = []
    for L in (6, 9):
        x = torch.relu(torch.randn(4, L, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64) + 0.3)
        mask = torch.rand(4, L) > 0.4
        mask[:, 0] = True
        x[~mask] = 50.0  # padding far from the data: it would dominate if it were counted
        batches.append({"x": x, "attention_mask": mask})
    lm = calibrate(M().eval(), batches, CalibrationConfig(show_progress=False)).moments["lin"]
    fit = solve(lin, SvdConfig(), 3, LayerData(lm.covariance(), lm.mean()), name="lin")
    approx = nn.Linear(10, 8).double()
    approx.weight.data = (fit.factors[0] @ fit.factors[1]).double()
    approx.bias.data = fit.bias.double()
    with torch.no_grad():
        y = torch.cat([lin(b["x"])[b["attention_mask"]] for b in batches])
        y2 = torch.cat([approx(b["x"])[b["attention_mask"]] for b in batches])
    err = (y - y2).pow(2).sum(1).mean()
    energy = (y - y.mean(0)).pow(2).sum(1).mean()
    # the factors are stored in float32: equal to float32 rounding of the weights
    assert float(err / energy) == pytest.approx(fit.sigma_error, rel=1e-6)


def test_tuples_are_positional_arguments_and_forward_takes_anything(single_thread):
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.mid, self.head = nn.Linear(6, 16), nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x, z):
            return self.head(torch.relu(self.mid(torch.relu(self.a(x) + self.b(z)))))

    net = Two().eval()
    x, z = torch.randn(40, 6), torch.randn(40, 4)
    cfg = config_from_options(rank=4, method="svd", sequential=False)
    res = ddtd.compress(net, (x, z), cfg)
    assert {r.name: r.method for r in res.report.layers}["mid"] == "svd"
    # the same through forward(model, batch) on a custom batch object
    cfg2 = config_from_options(rank=4, method="svd", sequential=False)
    from dataclasses import replace

    cfg2 = replace(cfg2, calibration=replace(cfg2.calibration, forward=lambda m, b: m(b["x"], b["z"])))
    res2 = ddtd.compress(net, [{"x": x[i:i + 8], "z": z[i:i + 8]} for i in range(0, 40, 8)], cfg2)
    with torch.no_grad():
        torch.testing.assert_close(res2.model(x, z), res.model(x, z), rtol=1e-4, atol=1e-5)


def test_held_out_split_never_concatenates_batches():
    batches = _token_batches(n_batches=5, B=4)
    kept, held = split_batches(batches, 0.25, seed=3)
    assert sum(len(b["input_ids"]) for b in kept + held) == 20 and sum(len(b["input_ids"]) for b in held) == 5
    assert {b["input_ids"].shape[1] for b in kept} <= {b["input_ids"].shape[1] for b in batches}


def test_loader_pairs_follow_the_model_signature():
    """A DataLoader of ``(x, y)`` pairs: a one-input model sees ``x`` (float targets too); a model
    taking two inputs sees both."""
    from ddtd.inputs import positional_arity, unpack_loader_batch

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x, scale):
            return self.lin(x * scale)

    one = nn.Linear(6, 3)
    x, y = torch.randn(5, 6), torch.rand(5, 1)
    assert positional_arity(one) == 1 and positional_arity(Two()) == 2
    assert unpack_loader_batch((x, y[:, 0]), 1) is x
    assert isinstance(unpack_loader_batch((x, y), 2), tuple)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    a = calibrate(Two(), loader, CalibrationConfig(show_progress=False)).moments["lin"]
    xs = x * y
    assert torch.allclose(a.mean()[0].double(), xs.mean(0).double(), atol=1e-6)
    b = calibrate(one, loader, CalibrationConfig(show_progress=False)).moments[""]
    assert torch.allclose(b.mean()[0].double(), x.mean(0).double(), atol=1e-6)
