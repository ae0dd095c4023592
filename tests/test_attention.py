"""nn.MultiheadAttention rewritten with nn.Linear projections: exact, compressed like any Linear,
saved and reloaded with the rest of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ddtd
from conftest import tiny_encoder
from ddtd.config import config_from_options
from ddtd.layers import ProjectedAttention, split_attention


def _qkv(batch_first, kdim, B=3, L=5, S=7, E=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, S, kdim or E, generator=g, dtype=dtype)
    v = torch.randn(B, S, kdim or E, generator=g, dtype=dtype)
    return (q, k, v) if batch_first else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_projected_attention_equals_multihead_attention(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).double().eval()
    new = ProjectedAttention.from_mha(mha)
    q, k, v = _qkv(batch_first, kdim)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -3:] = True
    additive = torch.randn(5, 7, dtype=torch.float64)
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    for kw in ({}, {"key_padding_mask": pad}, {"attn_mask": additive}, {"attn_mask": causal, "key_padding_mask": pad},
               {"need_weights": False, "key_padding_mask": pad}, {"average_attn_weights": False}):
        want, want_w = mha(q, k, v, **kw)
        got, got_w = new(q, k, v, **kw)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert (want_w is None) == (got_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-12)
    x, kv = torch.randn(5, 16, dtype=torch.float64), torch.randn(7, kdim or 16, dtype=torch.float64)  # unbatched
    torch.testing.assert_close(new(x, kv, kv)[0], mha(x, kv, kv)[0], rtol=0, atol=1e-12)


def test_split_keeps_an_encoder_exact_in_float32():
    """Against nn.TransformerEncoderLayer's fused fast path (eval), padding mask included."""
    model = tiny_encoder()
    x = torch.randn(4, 6, 8)
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, -2:] = True
    split = copy.deepcopy(model)
    names, kept = split_attention(split)
    assert names == ["enc.layers.0.self_attn", "enc.layers.1.self_attn"] and not kept
    with torch.no_grad():
        torch.testing.assert_close(split.enc(split.inp(x), src_key_padding_mask=pad),
                                   model.enc(model.inp(x), src_key_padding_mask=pad), rtol=0, atol=1e-5)
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True)
    assert split_attention(nn.Sequential(mha))[1] == {"0": "MultiheadAttention with add_bias_kv / add_zero_attn: "
                                                            "kept dense"}


def test_attention_projections_are_compressed_and_the_file_reloads(tmp_path, single_thread):
    model = tiny_encoder()
    model.ddtd_spec = {"source": "factory", "name": "conftest:tiny_encoder", "kwargs": {}}
    x = torch.randn(48, 6, 8) @ torch.randn(8, 8)
    res = ddtd.compress(model, x, config_from_options(ratio=1.3, method="svd", sequential=False))
    rows = {r.name: r for r in res.report.layers}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"enc.layers.0.self_attn.{proj}" in rows
    assert any(r.method == "svd" and "self_attn" in r.name for r in rows.values())
    assert res.report.ratio == pytest.approx(1.3, rel=0.02)
    path = tmp_path / "enc.ddtd"
    ddtd.save_model(res.model, path, spec=model.ddtd_spec, replacements=res.records)
    again = ddtd.load(path, trust_factory="conftest")
    with torch.no_grad():
        torch.testing.assert_close(again(x[:5]), res.model(x[:5]), rtol=0, atol=1e-6)


def test_an_attention_left_whole_keeps_its_out_proj_dense(single_thread):
    """An nn.MultiheadAttention that is not rewritten reads out_proj.weight itself: its
    out_proj must not be replaced by a chain (the report says why)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.att = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
            self.mid = nn.Linear(16, 16)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.mid(self.att(h, h, h, need_weights=False)[0]).mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(32, 5, 8)
    res = ddtd.compress(net, x, config_from_options(rank=4, method="svd", sequential=False))
    rows = {r.name: r for r in res.report.layers}
    assert rows["att.out_proj"].method == "dense" and "add_bias_kv" in rows["att.out_proj"].note
    assert rows["mid"].method == "svd"
    with torch.no_grad():
        res.model(x)  # still runs
