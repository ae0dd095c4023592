"""The calibration stage as one typed call: model + data -> per-layer input moments (+ a store)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm import tqdm

from ..config import CalibrationConfig
from ..inputs import batch_size as batch_size_of
from ..inputs import call_model, take, to_device, token_mask, unpack_loader_batch, positional_arity
from ..data import ImageFolder, ImageTransform
from .. import distributed
from ..errors import InputError, StoreMismatchError
from .collector import DEFAULT_MAX_DIM, LayerMoments, MomentCollector
from .store import CovarianceStore, StoreInfo, model_layers, new_source_id, write_store

__all__ = ["CalibrationResult", "calibrate", "first_layer_channels", "input_batches", "default_batch_size", "image_transform", "save_calibration", "warn_zero_variance",
           "ZERO_VARIANCE"]

log = logging.getLogger("ddtd")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` measured: raw moments per layer plus bookkeeping."""

    moments: dict[str, LayerMoments]
    info: StoreInfo
    seconds: float
    unreadable: list[str] = field(default_factory=list)
    non_images: int = 0

    @property
    def skipped(self) -> dict[str, str]:
        return self.info.skipped


def auto_batch_size(side: int) -> int:
    """32 images at 224 x 224, scaled with the pixel count, between 1 and 512."""
    return int(max(1, min(512, 32 * (224 * 224) // max(1, side * side))))


def first_layer_channels(model: nn.Module) -> int:
    """Input channels of the first Conv2d (3 if the model starts with something else)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, nn.Linear):
            break
    return 3


def image_transform(model: nn.Module, data, transform: ImageTransform | None) -> ImageTransform | None:
    """The preprocessing of an image folder: ``transform``, or by default 224 px, ImageNet mean /
    std and the model's input channels (``None`` for tensors and DataLoaders, used as they are)."""
    if transform is None and isinstance(data, (str, os.PathLike)):
        return ImageTransform(channels=first_layer_channels(model))
    return transform


def default_batch_size(data, transform: ImageTransform | None) -> int:
    """:func:`auto_batch_size` for the inputs' side (an image folder's transform, a float image
    tensor's last dim; 32 for other inputs)."""
    if transform is not None:
        return auto_batch_size(transform.size)
    if isinstance(data, torch.Tensor) and data.is_floating_point():
        return auto_batch_size(data.shape[-1])
    return 32


def input_batches(data, transform: ImageTransform | None, config: CalibrationConfig, batch_size: int, *,
                  progress=None, model: nn.Module | None = None, shard: bool = True):
    """The accepted data kinds as an iterator of batches (:mod:`ddtd.inputs`), plus the image
    folder (or ``None``) and a description of the source.

    ``data``: an image folder (path); a tensor (any dtype), a tuple of tensors (positional
    arguments) or a dict of tensors (keyword arguments) holding all samples, cut into batches of
    ``batch_size``; or an iterable of batches (a DataLoader, a list, a generator; an ``(inputs,
    labels)`` pair gives its inputs: :func:`ddtd.inputs.unpack_loader_batch`, told how many
    positional inputs ``model`` takes), used as they come. At most ``config.num_images``
    samples, drawn with ``config.seed``; ``progress(n)`` is told of every batch.

    In an initialised ``torch.distributed`` group with ``shard``, each rank gets its shard of them
    (:mod:`ddtd.distributed`): images and samples in contiguous blocks, batches by position."""
    shard = shard and distributed.active()
    num_images, seed = config.num_images, config.seed
    progress = progress or (lambda n: None)
    if isinstance(data, (str, os.PathLike)):
        folder = ImageFolder.scan(data)
        if shard:
            it = distributed.image_batches(folder, transform, num_images, seed, batch_size, progress)
        else:
            it = folder.batches(transform, num=num_images, seed=seed, batch_size=batch_size, progress=progress)
        return it, folder, {"images": str(Path(data)), "num_images": num_images, "seed": seed}
    if isinstance(data, (torch.Tensor, tuple, Mapping)):
        n = batch_size_of(data)
        n = n if num_images is None else min(n, num_images)
        start, stop = distributed.shard_bounds(n) if shard else (0, n)

        def chunks():
            for i in range(start, stop, batch_size):
                b = take(data, slice(i, min(stop, i + batch_size)))
                progress(batch_size_of(b))
                yield b
        kind = "tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        shape = list(data.shape) if isinstance(data, torch.Tensor) else n
        return chunks(), None, {kind: shape}
    if isinstance(data, Iterable):  # DataLoader or any iterable of batches / (inputs, labels) pairs
        arity = positional_arity(model) if model is not None else None
        mine, limit = distributed.batch_filter(data, num_images) if shard else ((lambda i: True), num_images)

        def gen():
            seen = 0
            for i, item in enumerate(data):
                b = unpack_loader_batch(item, arity)
                if limit is not None and batch_size_of(b) > limit - seen:
                    b = take(b, slice(0, max(0, limit - seen)))
                if batch_size_of(b) == 0:
                    break
                seen += batch_size_of(b)
                if mine(i):
                    progress(batch_size_of(b))
                    yield b
        return gen(), None, {"iterable": type(data).__name__}
    raise InputError(f"cannot calibrate on a {type(data).__name__}",
                     hint="pass an image folder path, a DataLoader / list of batches, or a tensor / tuple / dict batch")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data,
    config: CalibrationConfig | None = None,
    *,
    layers: str | list[str] | None = None,
    max_dim: int = DEFAULT_MAX_DIM,
    device: str | torch.device | None = None,
    check_variance: bool = True,
) -> CalibrationResult:
    """Run ``data`` through ``model`` and accumulate every selected layer's input moments.

    Args:
        model: any ``nn.Module`` (put in eval mode here; its weights are not changed).
        data: an image folder (path), a DataLoader / iterable of batches (or ``(x, y)`` pairs),
            or a tensor batch ``(N, C, H, W)`` of already preprocessed inputs.
        config: :class:`ddtd.config.CalibrationConfig`: the image folder's ``transform``
            (default: 224 px, ImageNet mean / std, the model's input channels), ``num_images``
            and ``seed`` (how many inputs, sampled reproducibly), ``batch_size`` (default: 32 at
            224 x 224, scaled with the pixel count up to 512, so small images amortise the
            per-batch accumulation) and ``show_progress``.
        layers: globs / ``re:`` patterns selecting Conv2d / Linear layers by qualified name.
        max_dim: layers whose patch length exceeds it are skipped (reason recorded).
        device: where the forward pass and the accumulators live (default: the model's).
        check_variance: log a warning for layers whose inputs (almost) do not vary across the
            samples (blank or identical images; see :func:`warn_zero_variance`).

    In an initialised ``torch.distributed`` group, call it on every rank: each rank runs its
    shard of ``data`` and every rank returns the sums of all of them (:mod:`ddtd.distributed`);
    an error on one rank raises :class:`ddtd.distributed.RankFailure` on every rank.

    Returns:
        A :class:`CalibrationResult` with float64 raw sums per layer.
    """
    with distributed.shared_failures():
        return _calibrate(model, data, config, layers, max_dim, device, check_variance)


def _calibrate(model: nn.Module, data, config, layers, max_dim, device, check_variance) -> CalibrationResult:
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            "a TorchScript model cannot be calibrated: its layers do not run Python hooks",
            hint="load the eager model instead (--model ARCH --weights STATE_DICT, a factory, or a .ddtd file)",
        )
    from ..checks import check_finite_weights, check_has_layers, resolve_device

    resolve_device(device)
    check_has_layers(model)
    check_finite_weights(model)
    model.eval()
    if device is not None:
        model.to(device)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    config = config or CalibrationConfig()
    num_images, seed, show_progress = config.num_images, config.seed, config.show_progress
    transform = image_transform(model, data, config.transform)
    batch_size = config.batch_size or default_batch_size(data, transform)
    t0 = time.time()
    quiet = distributed.rank() != 0 or (show_progress is not None and not show_progress)
    bar = tqdm(total=num_images if isinstance(data, (str, os.PathLike)) else None,
               unit="img", desc="calibrating", disable=True if quiet else None if show_progress is None else False)
    batches, folder, source = input_batches(data, transform, config, batch_size, progress=bar.update, model=model)
    count = 0
    collector = MomentCollector(model, layers=layers, max_dim=max_dim)
    for name, reason in collector.skipped.items():
        log.warning("skipping layer '%s': %s", name, reason)
    try:
        with collector:
            for b in batches:
                b = to_device(b, dev)
                collector.mask = token_mask(b, config.mask)
                call_model(model, b, config.forward)
                count += batch_size_of(b)
    finally:
        bar.close()
    moments, count, _ = distributed.sum_moments(collector.moments, count, collector.hooked, dev)
    if count == 0:
        raise InputError("no calibration inputs were given", hint="pass a non-empty image folder, DataLoader or tensor")
    if check_variance:
        warn_zero_variance(moments)
    return _result(model, collector, moments, folder, source, count, transform, seed, time.time() - t0)


def _result(model: nn.Module, collector: MomentCollector, moments: dict, folder, source: dict, count: int, transform,
            seed, seconds: float) -> CalibrationResult:
    """The :class:`CalibrationResult` of a finished pass, with the store's bookkeeping."""
    skipped = dict(collector.skipped)
    for n in collector.hooked:
        if n not in moments:
            skipped[n] = "never called in the forward pass"
            log.warning("layer '%s' was never called in the forward pass; it is not stored", n)
    source["used"] = count
    source["id"] = distributed.broadcast(new_source_id())
    if distributed.active():
        source["world_size"] = distributed.world_size()
    info = StoreInfo(layers=model_layers(model), num_images=count, seed=seed, sources=[source], skipped=skipped,
                     transform=transform.to_dict() if folder is not None else {"external": True})
    result = CalibrationResult(moments=moments, info=info, seconds=seconds,
                               unreadable=list(folder.unreadable) if folder else [],
                               non_images=folder.non_images if folder else 0)
    if result.unreadable or result.non_images:
        log.warning("skipped %d unreadable image files and %d non-image files",
                    len(result.unreadable), result.non_images)
    return result


#: A layer whose inputs keep less than this share of their energy in variation across samples is
#: reported as having (almost) no variance: its Sigma error cannot say which outputs matter.
ZERO_VARIANCE = 1e-8


def warn_zero_variance(moments) -> list[str]:
    """Log a warning for each layer whose inputs (almost) do not vary; return their names."""
    flat = [name for name, lm in moments.items() if lm.variance_fraction() < ZERO_VARIANCE]
    if flat:
        log.warning("%d layer(s) saw inputs with (almost) zero variance across the calibration samples "
                    "(e.g. '%s'): the images may be blank or identical, and the data-driven fit of those layers "
                    "is meaningless; calibrate on varied, real images", len(flat), flat[0])
    return flat


def save_calibration(result: CalibrationResult, path: str | os.PathLike, append: bool = False) -> Path:
    """Write a calibration to ``path`` atomically; with ``append`` add it to the store already there."""
    path = Path(path)
    moments, info = result.moments, result.info
    if append:
        old = CovarianceStore(path)
        if old.info.fingerprint != info.fingerprint:
            from .store import first_difference

            raise StoreMismatchError(
                f"cannot append: '{path}' was made for another model: "
                + first_difference(old.info.layers, info.layers),
                hint="append only runs of the same model, or write a new store with -o",
            )
        if old.info.transform != info.transform:
            raise StoreMismatchError(
                f"cannot append: '{path}' used transform {old.info.transform}, this run {info.transform}",
                hint="use the same --size/--resize/--mean/--std as the stored run",
            )
        if set(old.names) != set(moments):
            raise StoreMismatchError(
                f"cannot append: '{path}' holds other layers than this run",
                hint="use the same --layers and --max-dim as the stored run",
            )
        moments = {name: old[name].add(moments[name].to_cpu()) for name in old.names}
        info = StoreInfo(
            layers=info.layers,
            num_images=old.info.num_images + info.num_images,
            transform=info.transform,
            seed=old.info.seed if old.info.seed == info.seed else None,
            sources=old.info.sources + info.sources,
            skipped={**old.info.skipped, **info.skipped},
        )
    return write_store(path, moments, info)
