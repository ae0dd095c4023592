"""Evaluation: top-1 accuracy, agreement with the original model, output error, latency (on the
evaluation device)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .config import CalibrationConfig
from .data import ImageFolder, ImageTransform
from .errors import InputError

__all__ = ["EvalResult", "evaluate", "latency"]


@dataclass
class EvalResult:
    images: int
    accuracy: float | None = None  # top-1 of the model on a labelled folder
    reference_accuracy: float | None = None
    agreement: float | None = None  # top-1 agreement with the reference model
    relative_output_error: float | None = None  # ||y - y_ref|| / ||y_ref|| over all outputs
    latency_ms: dict | None = None
    reference_latency_ms: dict | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images,
    config: CalibrationConfig,
    *,
    reference: nn.Module | None = None,
    device: str | torch.device = "cpu",
    labels: bool = True,
) -> EvalResult:
    """Accuracy on a labelled image folder (class sub-folders); with ``reference``, top-1
    agreement and relative output error against it (any folder). ``config`` says how the images
    are read: ``transform`` (required), ``num_images`` and ``seed`` (a reproducible sample),
    ``batch_size`` (default 128).

    Labels: the first-level sub-folders, sorted by name, are the class indices ``0 .. K-1``
    (torchvision's ``ImageFolder`` convention). A folder whose ``K`` differs from the model's
    number of outputs is refused before any image is scored (the indices could not mean the
    model's classes); ``labels=False`` ignores the folders and measures only the agreement with
    ``reference``.
    """
    transform, num_images, seed, batch_size = config.transform, config.num_images, config.seed, config.batch_size or 128
    folder = ImageFolder.scan(images)
    if not labels:
        folder.classes = []
    model.eval().to(device)
    if reference is not None:
        reference.eval().to(device)
    n = correct = correct_ref = agree = 0
    err2 = ref2 = 0.0
    labelled = bool(folder.classes)
    for x, y in folder.batches(transform, num=num_images, seed=seed, batch_size=batch_size, labels=True):
        x = x.to(device)
        out = model(x)
        if n == 0 and labelled and (out.dim() != 2 or out.shape[1] != len(folder.classes)):
            outputs = out.shape[1] if out.dim() == 2 else tuple(out.shape[1:])
            raise InputError(
                f"'{images}' has {len(folder.classes)} class folders ({', '.join(folder.classes[:5])}"
                f"{', ...' if len(folder.classes) > 5 else ''}) but the model has {outputs} outputs; "
                "class folders sorted by name are taken as class indices 0..K-1, so the accuracy would be "
                "meaningless",
                hint="give a folder with one sub-folder per model class (sorted names = class indices), "
                "or pass --no-labels (with --reference) to measure only the agreement with the original")
        pred = out.argmax(1).cpu()
        n += len(x)
        if labelled:
            correct += int((pred == y).sum())
        if reference is not None:
            ref = reference(x)
            agree += int((pred == ref.argmax(1).cpu()).sum())
            err2 += float((out - ref).double().pow(2).sum())
            ref2 += float(ref.double().pow(2).sum())
            if labelled:
                correct_ref += int((ref.argmax(1).cpu() == y).sum())
    if n == 0:
        raise InputError(f"no images evaluated from {images}")

    res = EvalResult(images=n)
    if labelled:
        res.accuracy = correct / n
    if reference is not None:
        res.agreement = agree / n
        res.relative_output_error = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
        if labelled:
            res.reference_accuracy = correct_ref / n
    return res


@torch.no_grad()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch_sizes=(1, 32), repeats: int = 20,
            warmup: int = 3, device: str | torch.device = "cpu") -> dict:
    """Median wall-clock milliseconds per forward pass for each batch size."""
    model.eval().to(device)
    out = {}
    for bs in batch_sizes:
        x = torch.randn(bs, *input_shape, device=device)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats if bs == 1 else max(5, repeats // 4)):
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        out[f"batch{bs}"] = statistics.median(times)
    return out


def paired_latency(models: dict[str, nn.Module], input_shape, batch_sizes=(1, 32), rounds: int = 5,
                   repeats: int = 10, device: str | torch.device = "cpu") -> dict[str, dict]:
    """Latency of several models on ``device`` measured in alternating rounds (fair on a busy
    machine)."""
    acc: dict[str, dict[str, list]] = {k: {} for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            for k, v in latency(m, input_shape, batch_sizes, repeats=repeats, warmup=1, device=device).items():
                acc[name].setdefault(k, []).append(v)
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in acc.items()}
