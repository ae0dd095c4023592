"""Calibration images: find them, sample them reproducibly, decode and preprocess them.

Every file under a folder is a candidate (class sub-folders allowed). Files that are not images
or cannot be decoded are skipped and counted; a folder with no readable image is an error.

Preprocessing (``ImageTransform``) is one function used both here and by the reference-model
training in ``examples/``, so the calibration data is exactly what the model saw in training:
convert to the model's channel count, scale to ``[0, 1]``, resize the shorter side to
``resize`` (bilinear, antialiased), centre-crop ``size x size``, normalise by ``mean`` / ``std``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageTransform",
    "ImageFolder",
    "preprocess",
]

log = logging.getLogger("ddtd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass(frozen=True)
class ImageTransform:
    """How images become model inputs. Stored in the covariance file so runs can be compared.

    ``mean`` / ``std`` are per channel; a 3-value mean for a 1-channel model is averaged.
    ``resize`` (shorter side before the centre crop) defaults to ``size``.
    """

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None

    def __post_init__(self):
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise InputError(
                f"invalid image size {self.size} / resize {self.resize}",
                hint="use --size > 0 and --resize >= --size",
            )
        if self.channels not in (1, 3):
            raise InputError(
                f"the model's first layer takes {self.channels} channels; images give 1 or 3",
                hint="pass --channels 1 or 3 if the first layer is not the input layer",
            )
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.channels, 3):
                raise InputError(f"--{name} needs 1 or {self.channels} values, got {len(vals)}")
        if any(s <= 0 for s in self.std):
            raise InputError("--std values must be positive")

    def per_channel(self, vals: Sequence[float]) -> torch.Tensor:
        t = torch.tensor(vals, dtype=torch.float32)
        if len(t) == self.channels:
            return t
        if len(t) == 1:
            return t.expand(self.channels).clone()
        return t.mean().reshape(1).expand(self.channels).clone()  # 3 values, 1 channel

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = self.resize or self.size
        return json.loads(json.dumps(d))  # plain JSON types, as read back from a store


def preprocess(images: torch.Tensor, t: ImageTransform) -> torch.Tensor:
    """``uint8 (N, c, H, W)`` (c = 1 or t.channels) -> normalised ``float32 (N, channels, size, size)``."""
    x = images.float().div_(255.0)
    if x.shape[1] != t.channels:
        if x.shape[1] == 1:
            x = x.expand(-1, t.channels, -1, -1)
        else:  # RGB -> L with ITU-R 601 weights (what PIL's convert('L') uses)
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
    short = t.resize or t.size
    h, w = x.shape[-2:]
    if min(h, w) != short:
        scale = short / min(h, w)
        new = (max(short, round(h * scale)), max(short, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - t.size) // 2, (w - t.size) // 2
    x = x[..., top : top + t.size, left : left + t.size]
    mean = t.per_channel(t.mean).view(1, -1, 1, 1)
    std = t.per_channel(t.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _decode(path: Path, channels: int) -> torch.Tensor:
    """Decode one file to ``uint8 (channels, H, W)``; raises on anything unreadable."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(img.height, img.width, channels).permute(2, 0, 1).contiguous()


@dataclass
class ImageFolder:
    """All candidate files under ``root``, with class labels from the first sub-folder level.

    ``sample(n, seed)`` picks ``n`` files reproducibly; ``batches()`` decodes lazily, skipping
    (and counting in ``unreadable``) files that fail to decode.
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    non_images: int = 0
    unreadable: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    @classmethod
    def scan(cls, root: str | os.PathLike) -> "ImageFolder":
        root = Path(root)
        if not root.is_dir():
            raise InputError(
                f"image folder '{root}' does not exist or is not a folder",
                hint="pass --images DIR with image files (class sub-folders allowed); "
                "`python calib/make_subset.py` writes one from Fashion-MNIST",
            )
        files, non_images = [], 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(p)
                else:
                    non_images += 1
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        folder = cls(root=root, files=files, non_images=non_images, classes=classes)
        if not files:
            raise InputError(
                f"no image files under '{root}' ({non_images} other files)",
                hint=f"put {', '.join(sorted(IMAGE_EXTENSIONS)[:5])}... images there, "
                "or build a subset with `python calib/make_subset.py`",
            )
        return folder

    def label_of(self, path: Path) -> int:
        parts = path.relative_to(self.root).parts
        if len(parts) < 2 or not self.classes:
            return -1
        return self.classes.index(parts[0])

    def sample(self, num: int | None, seed: int = 0) -> list[Path]:
        """``num`` files in a reproducible order (all files, shuffled, when ``num`` is None)."""
        order = list(self.files)
        random.Random(seed).shuffle(order)
        return order if num is None else order[: max(num, 0)]

    def batches(
        self,
        transform: ImageTransform,
        num: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        labels: bool = False,
        progress=None,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield preprocessed batches of ``num`` readable images (fewer only if the folder runs out).

        Unreadable files are skipped, counted in ``self.unreadable`` and replaced by the next
        file of the seeded order, so ``num`` images are used whenever the folder has them.
        ``progress`` is called with the number of images in each batch.
        """
        order = self.sample(None, seed)
        yield from self.decode(order, transform, len(order) if num is None else num, batch_size, labels, progress)
        if self.used == 0:
            raise InputError(
                f"none of the {len(order)} image files under '{self.root}' could be read "
                f"({len(self.unreadable)} unreadable, e.g. {self.unreadable[0] if self.unreadable else '-'})",
                hint="check the files are valid images (try opening one), or point --images elsewhere",
            )

    def decode(self, paths: list[Path], transform: ImageTransform, want: int, batch_size: int = 32,
               labels: bool = False, progress=None):
        """Yield preprocessed batches of the first ``want`` readable files of ``paths``, in order
        (the work of :meth:`batches`). Unreadable files are skipped and added to ``unreadable``;
        ``used`` counts the images yielded by this call."""
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        self.used = 0
        for path in paths:
            if self.used >= want:
                break
            try:
                img = _decode(path, transform.channels)
            except Exception as exc:  # PIL raises many types for corrupt files
                self.unreadable.append(f"{path}: {type(exc).__name__}")
                log.debug("skipping unreadable %s (%s)", path, exc)
                continue
            self.used += 1
            xs.append(preprocess(img.unsqueeze(0), transform))
            ys.append(self.label_of(path))
            if len(xs) == batch_size or self.used == want:
                yield self._emit(xs, ys, labels, progress)
                xs, ys = [], []
        if xs:
            yield self._emit(xs, ys, labels, progress)

    @staticmethod
    def _emit(xs, ys, labels, progress):
        x = torch.cat(xs)
        if progress is not None:
            progress(len(xs))
        return (x, torch.tensor(ys)) if labels else x
