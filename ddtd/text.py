"""Text models from a local Hugging Face directory, and text calibration inputs.

Needs the optional ``transformers`` package (``pip install 'ddtd[text]'``). Nothing is ever
downloaded: models and tokenizers load with ``local_files_only=True`` (safetensors weights
preferred), and no code from the directory runs (``trust_remote_code`` stays off; the model class
must be one of ``transformers``' own).

* :func:`load_hf_model` - ``config.json`` + weights in a directory -> the model in eval mode,
  with a ``ddtd_spec`` that rebuilds the architecture from the config alone (the compressed file
  does not need the directory);
* :func:`text_batches` - one sample per line of a text file (or one per ``.txt`` file of a
  folder), tokenized into dict batches (``input_ids``, ``attention_mask``, ...) padded per batch,
  so batches have different lengths and padding is masked out of every statistic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

__all__ = ["is_hf_dir", "load_hf_model", "build_hf_model", "text_batches", "read_texts"]


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise InputError("text models need the transformers package", hint="pip install 'ddtd[text]'") from exc
    return transformers


def is_hf_dir(path) -> bool:
    """A local Hugging Face model directory (it has a ``config.json``)."""
    p = Path(str(path))
    return p.is_dir() and (p / "config.json").is_file()


def _model_class(transformers, name: str):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise InputError(f"'{name}' is not a model class of the transformers library",
                         hint="ddtd loads only transformers' own architectures (no remote code)")
    return cls


def load_hf_model(directory: str | os.PathLike) -> nn.Module:
    """The model saved in ``directory`` (``save_pretrained``), in eval mode, float32."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    name = (config.architectures or ["AutoModel"])[0]
    cls = transformers.AutoModel if name == "AutoModel" else _model_class(transformers, name)
    model = cls.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    model.ddtd_spec = {"source": "huggingface", "name": type(model).__name__,
                       "kwargs": {"config_json": config.to_json_string()}}
    return model.float().eval()


def build_hf_model(name: str, config_json: str) -> nn.Module:
    """The architecture ``name`` (a transformers model class) from its config, random weights."""
    transformers = _transformers()
    cls = _model_class(transformers, name)
    d = json.loads(config_json)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    return cls(config).eval()


def read_texts(path: str | os.PathLike) -> list[str]:
    """The samples of ``path``: the non-empty lines of a text file, or the contents of every
    ``.txt`` file of a folder (sorted by name)."""
    p = Path(str(path))
    if p.is_dir():
        texts = [f.read_text(encoding="utf-8", errors="replace").strip() for f in sorted(p.glob("*.txt"))]
    elif p.is_file():
        texts = [line.strip() for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    else:
        raise InputError(f"--text '{p}' not found", hint="give a text file (one sample per line) or a folder of .txt files")
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"--text '{p}' holds no text", hint="give a text file with one sample per line")
    return texts


def text_batches(path, tokenizer_dir, *, max_length: int = 128, batch_size: int = 32, num: int | None = None,
                 seed: int = 0) -> list[dict]:
    """Tokenized dict batches of the samples of ``path`` (a reproducible sample of ``num`` of
    them, in file order), each padded to its own longest sample (at most ``max_length`` tokens)."""
    transformers = _transformers()
    if max_length < 1 or batch_size < 1:
        raise InputError("max_length and batch_size must be at least 1", hint="e.g. --max-length 128")
    texts = read_texts(path)
    if num is not None and num < len(texts):
        keep = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:num].sort().values
        texts = [texts[i] for i in keep.tolist()]
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
    return out
