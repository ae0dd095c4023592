"""Checks that run before any work starts: output paths, devices, finite weights.

Every check raises :class:`ddtd.errors.InputError` (or :class:`~ddtd.errors.NumericalError`)
with the next step to take, so a run that would fail at the end fails in its first second and
nothing the user gave as input is ever replaced by an output.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .errors import InputError, NumericalError

__all__ = ["check_outputs", "resolve_device", "check_finite_weights", "check_has_layers", "unsupported_layers"]


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (links followed, existing or not)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(outputs: dict[str, str | os.PathLike | None],
                  inputs: dict[str, str | os.PathLike | Iterable | None]) -> None:
    """Refuse an output that is one of the inputs, an existing directory, or not writable.

    Args:
        outputs: option name -> output path (``None`` entries are ignored).
        inputs: option name -> input path or list of paths (``None`` entries are ignored).
    """
    ins: list[tuple[str, Path]] = []
    for opt, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        ins += [(opt, Path(v)) for v in values]
    seen: dict[Path, str] = {}
    for opt, value in outputs.items():
        if value is None:
            continue
        out = Path(value)
        for in_opt, src in ins:
            if _same_file(out, src):
                raise InputError(f"the output {opt} '{out}' is the input {in_opt} '{src}'; writing it would "
                                 "replace the input", hint=f"choose another {opt} path")
        key = out.resolve()
        if key in seen:
            raise InputError(f"{opt} and {seen[key]} are the same file '{out}'", hint="give them different paths")
        seen[key] = opt
        if out.is_dir():
            raise InputError(f"the output {opt} '{out}' is a directory", hint="give a file path, e.g. DIR/name.ext")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"cannot create {opt} '{out}': '{parent}' is not a directory",
                             hint="choose an output in an existing, writable folder")
        if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise InputError(f"cannot write {opt} '{out}' (no write permission or a read-only file system)",
                             hint="choose an output in a writable folder")
        try:  # os.access does not see read-only mounts everywhere: try it
            probe = parent / f".ddtd-write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise InputError(f"cannot write {opt} '{out}' ({exc.strerror or exc})",
                             hint="choose an output in a writable folder") from exc


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Parse and check a device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if device is None or isinstance(device, torch.device) and device.type == "cpu":
        return None if device is None else device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device '{device}'", hint="use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is available on this machine "
                             "(or this PyTorch build has no CUDA support)", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                             hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError(f"--device {device}: MPS is not available", hint="use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"device type '{dev.type}' is not supported", hint="use cpu, cuda, cuda:N or mps")
    return dev


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`NumericalError` naming the first parameter / buffer holding NaN or Inf."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NumericalError(
                    f"the model's {kind} '{name}' holds {bad} NaN / Inf value(s) of {t.numel()}",
                    hint="check the checkpoint (it was saved from a diverged run or is damaged); "
                    "ddtd compresses only finite weights")


def check_has_layers(model: nn.Module) -> None:
    """Raise :class:`InputError` when the model has no Conv2d / Linear layer (nothing to do)."""
    if not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()):
        raise InputError("the model has no Conv2d or Linear layer, so there is nothing ddtd can calibrate or "
                         "compress", hint="pass a model built from Conv2d / Linear layers")


#: Layer types that hold weights but have no ddtd format; listed as dense with this reason.
UNSUPPORTED_REASON = "layer type not supported by ddtd's formats (kept dense)"


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Weight-holding leaf modules that ddtd leaves dense (ConvTranspose, Conv1d / 3d, Embedding...),
    by qualified name, with the type in the reason."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) or any(True for _ in m.children()):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[name] = f"{type(m).__name__}: {UNSUPPORTED_REASON}"
    return out
