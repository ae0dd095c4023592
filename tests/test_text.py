"""Text models: a local Hugging Face BERT-style directory (random weights, made here) compressed
from the command line on a text file; the written file reloads without the directory."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ddtd  # noqa: E402
from ddtd.cli import main  # noqa: E402
from ddtd.model_io import read_model_file_meta  # noqa: E402
from ddtd.text import load_hf_model, read_texts, text_batches  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow big small red blue green house tree car road sun moon".split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(out)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(120)]
    (out / "text.txt").write_text("\n".join(lines) + "\n")
    return out


def test_text_batches_have_their_own_lengths_and_masks(bert_dir):
    batches = text_batches(bert_dir / "text.txt", bert_dir, max_length=10, batch_size=16)
    assert sum(len(b["input_ids"]) for b in batches) == len(read_texts(bert_dir / "text.txt")) == 120
    assert all(b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] <= 10 for b in batches)
    assert any(not b["attention_mask"].all() for b in batches)  # padding present, masked


def test_cli_compresses_a_text_model_and_the_file_reloads(bert_dir, tmp_path, capsys):
    out = tmp_path / "bert2x.ddtd"
    code = main(["compress", "--model", str(bert_dir), "--text", str(bert_dir / "text.txt"), "--tokenizer",
                 str(bert_dir), "--ratio", "2", "-o", str(out)])
    assert code == 0
    report = read_model_file_meta(out)["report"]
    assert report["ratio"] == pytest.approx(2.0, rel=0.02)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["encoder.layer.0.attention.self.query"]["method"] != "dense"  # not "the input layer"
    assert rows["embeddings.word_embeddings"]["method"] == "dense"
    moved = bert_dir.with_name(bert_dir.name + "-moved")
    bert_dir.rename(moved)  # the model directory is gone: the file rebuilds from the config it keeps
    try:
        small = ddtd.load(out)
    finally:
        moved.rename(bert_dir)
    ref = load_hf_model(bert_dir)
    batch = text_batches(bert_dir / "text.txt", bert_dir, batch_size=8)[0]
    with torch.no_grad():
        y, y0 = small(**batch).last_hidden_state, ref(**batch).last_hidden_state
    assert y.shape == y0.shape and float((y - y0).norm() / y0.norm()) < 0.2


def test_ratio_of_the_layers_alone(bert_dir):
    model = load_hf_model(bert_dir)
    batches = text_batches(bert_dir / "text.txt", bert_dir, batch_size=16)
    res = ddtd.compress(model, batches, ddtd.config_from_options(ratio=3, scope="layers", method="svd",
                                                                 sequential=False))
    assert res.report.settings["scope"] == "layers"
    assert res.report.settings["layers_ratio"] == pytest.approx(3.0, rel=0.03)
    assert res.report.ratio < 3.0  # the embeddings stay as they are
