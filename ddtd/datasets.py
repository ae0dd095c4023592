"""Fashion-MNIST from the local Debian package (no network): ``apt-get install dataset-fashion-mnist``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path(os.environ.get("DDTD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None):
    """Return ``(images uint8 (N, 1, 28, 28), labels int64 (N,))`` for ``split`` in train / test."""
    root = Path(root) if root else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise InputError(
            f"Fashion-MNIST files not found under {root}",
            hint="run `apt-get install dataset-fashion-mnist` (or set DDTD_FASHION_MNIST to the folder "
            "holding the four idx .gz files)",
        )
    images = torch.from_numpy(_read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    return images, labels
