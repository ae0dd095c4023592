"""Loading and saving models without executing pickled code.

``--model`` accepts:

* a torchvision architecture name (``resnet18``), with ``--weights PATH`` to a local state dict
  and ``--num-classes`` where it differs from the default; nothing is ever downloaded;
* ``package.module:factory`` (a callable returning an ``nn.Module``), with optional ``--weights``;
* a path to a ddtd model file (:func:`save_model`): architecture spec + state dict;
* a path to a TorchScript file (usable for evaluation; calibration needs an eager model).

Every checkpoint is read with ``torch.load(..., weights_only=True)``.

What a ddtd model file may execute: nothing of its own choosing. Its spec names an
architecture; a torchvision architecture and ddtd's own :mod:`ddtd.zoo` are built without
asking, with plain-data keyword arguments (numbers, strings, lists; never ``weights`` or
anything that would fetch them). A spec naming any other ``module:function`` is refused unless
the caller trusts that module for this load (``trust_factory="mypkg"`` /
``--trust-factory mypkg``): importing a module runs its code, so the choice is the user's, not
the file's. The replacements in the file are data (layer names, kinds, shapes) replayed by
:func:`ddtd.layers.apply_replacements` with ddtd's own layer classes.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .atomic import atomic_path
from .errors import InputError

__all__ = ["ModelSpec", "load_model", "save_model", "build_from_spec", "load_state_dict_file"]

FORMAT_VERSION = 1

#: Factory modules a model file may name without an explicit opt-in (ddtd's own architectures).
TRUSTED_FACTORY_MODULES = ("ddtd.zoo",)
_SAFE_KWARG_TYPES = (bool, int, float, str, type(None))

#: Spec of how to rebuild an architecture: {"source": "torchvision"|"factory", "name": str,
#: "kwargs": dict}. Plain data so it survives ``weights_only=True``.
ModelSpec = dict


def _module_trusted(mod_name: str, trusted) -> bool:
    return any(mod_name == t or mod_name.startswith(t + ".") for t in trusted)


def _trusted_list(trust_factory) -> tuple[str, ...]:
    if trust_factory is None:
        return ()
    if isinstance(trust_factory, str):
        return tuple(t.strip() for t in trust_factory.split(",") if t.strip())
    return tuple(trust_factory)


def _check_spec(spec, where: str) -> tuple[str, str, dict]:
    """Validate a spec's shape and keyword arguments (plain data only) before anything runs."""
    if not isinstance(spec, dict) or not isinstance(spec.get("source"), str) or not isinstance(spec.get("name"), str):
        raise InputError(f"{where} has a damaged architecture spec", hint="re-create the file with ddtd compress")
    kwargs = spec.get("kwargs", {}) or {}
    if not isinstance(kwargs, dict):
        raise InputError(f"{where}: the spec's kwargs are not a mapping", hint="re-create the file with ddtd compress")

    def plain(v):
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return isinstance(v, _SAFE_KWARG_TYPES)

    for k, v in kwargs.items():
        if not isinstance(k, str) or not plain(v) or k.startswith("weights") or k == "progress":
            raise InputError(f"{where}: the spec's argument {k!r} is not allowed (plain numbers / strings only, "
                             "no weights)", hint="re-create the file with ddtd compress")
    return spec["source"], spec["name"], dict(kwargs)


def build_from_spec(spec: ModelSpec, *, trust_factory=None, where: str = "the spec",
                    trust_all: bool = False) -> nn.Module:
    """Instantiate an architecture (random weights) from a spec.

    Args:
        spec: ``{"source": "torchvision" | "factory", "name": ..., "kwargs": {...}}``.
        trust_factory: module name(s) (``"mypkg"`` or ``["a", "b.models"]``) whose factories may be
            imported and called; :data:`TRUSTED_FACTORY_MODULES` are always allowed.
        where: what the spec comes from, for messages.
        trust_all: the spec was typed by the user (``--model pkg:fn``), not read from a file.
    """
    source, name, kwargs = _check_spec(spec, where)
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        except ValueError as exc:
            raise InputError(
                f"unknown torchvision architecture '{name}'",
                hint="use a name from torchvision.models.list_models(), a 'package.module:factory', "
                "or a path to a saved model file",
            ) from exc
        except TypeError as exc:
            raise InputError(f"torchvision architecture '{name}' does not accept {sorted(kwargs)} ({exc})",
                             hint="drop --num-classes or check the architecture name") from exc
    if source == "factory":
        mod_name, _, fn_name = name.partition(":")
        if not mod_name or not fn_name:
            raise InputError(f"factory '{name}' is not 'package.module:function'",
                             hint="give the factory as 'package.module:function'")
        trusted = TRUSTED_FACTORY_MODULES + _trusted_list(trust_factory)
        if not trust_all and not _module_trusted(mod_name, trusted):
            raise InputError(
                f"{where} names the factory '{name}'; loading it would import and run code from module "
                f"'{mod_name}', which is not trusted",
                hint=f"if you trust that module, pass --trust-factory {mod_name} "
                f"(Python: trust_factory='{mod_name}'); torchvision architectures and ddtd.zoo need no opt-in",
            )
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise InputError(
                f"cannot import factory '{name}' ({exc})",
                hint="give 'package.module:function' importable from the current environment",
            ) from exc
        if not callable(fn):
            raise InputError(f"factory '{name}' is not callable", hint="name a function returning an nn.Module")
        try:
            model = fn(**kwargs)
        except TypeError as exc:
            raise InputError(f"factory '{name}' does not accept the arguments {sorted(kwargs)} ({exc})",
                             hint="drop --num-classes if the factory fixes its classes, or check the factory") from exc
        if not isinstance(model, nn.Module):
            raise InputError(f"factory '{name}' returned {type(model).__name__}, not an nn.Module")
        return model
    if source == "huggingface":
        from .text import build_hf_model

        if not isinstance(kwargs.get("config_json"), str):
            raise InputError(f"{where}: the Hugging Face spec has no config", hint="re-create the file with ddtd compress")
        return build_hf_model(name, kwargs["config_json"])
    raise InputError(f"unknown model source '{source}' in {where}", hint="re-create the file with ddtd compress")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (or a checkpoint dict holding one) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file '{path}' not found", hint="pass --weights PATH to a local state dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read weights '{path}' safely ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            hint="save weights with torch.save(model.state_dict(), path); ddtd never unpickles code",
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"'{path}' does not hold a state dict of tensors")
    # Checkpoints saved from DataParallel / torch.compile carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    sd = load_state_dict_file(weights)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:200])
        raise InputError(
            f"weights '{weights}' do not fit the architecture: {first}",
            hint="check --model and --num-classes match the checkpoint",
        ) from exc
    if missing or unexpected:
        raise InputError(
            f"weights '{weights}' do not fit the architecture: missing {missing[:4]}, unexpected {unexpected[:4]}",
            hint="check --model and --num-classes match the checkpoint",
        )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or n.endswith("code/") or "/code/" in n for n in zf.namelist())


def load_model(
    model: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    *,
    trust_factory: str | list[str] | None = None,
) -> nn.Module:
    """Load a model in eval mode from a name, a factory or a file (see module docstring).

    ``trust_factory``: module name(s) whose factory a model *file* may name (see the module
    docstring); a factory given directly as ``model="pkg.mod:fn"`` is the caller's own choice.
    """
    text = str(model)
    path = Path(text)
    from .text import is_hf_dir

    if is_hf_dir(path):
        from .text import load_hf_model

        m = load_hf_model(path)
        if weights:
            _load_weights(m, weights)
    elif path.suffix and path.exists() and path.is_file():
        if _is_torchscript(path):
            try:
                m = torch.jit.load(str(path), map_location=device)
            except Exception as exc:
                raise InputError(f"cannot load '{path}' as TorchScript ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})",
                                 hint="pass a file saved by torch.jit.save or ddtd compress --export torchscript") from exc
        else:
            m = _load_ddtd_file(path, trust_factory=trust_factory)
            if weights:
                _load_weights(m, weights)
    elif path.suffix in {".pt", ".pth", ".ddtd", ".ts"} or os.sep in text:
        raise InputError(f"model file '{text}' not found", hint="check the path given to --model")
    else:
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        source = "factory" if ":" in text else "torchvision"
        m = build_from_spec({"source": source, "name": text, "kwargs": kwargs}, trust_all=True,
                            where=f"--model {text}")
        m.ddtd_spec = {"source": source, "name": text, "kwargs": kwargs}
        if weights:
            _load_weights(m, weights)
    return m.to(device).eval()


def _load_ddtd_file(path: Path, trust_factory=None) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot read model file '{path}' safely ({type(exc).__name__})",
            hint="ddtd loads .ddtd files, TorchScript files, or an architecture name with --weights; "
            "a pickled nn.Module is not loaded because that would execute code",
        ) from exc
    if not isinstance(obj, dict) or "ddtd_format" not in obj:
        raise InputError(
            f"'{path}' is not a ddtd model file",
            hint="for a plain state dict use --model ARCH --weights PATH",
        )
    if not isinstance(obj["ddtd_format"], int) or obj["ddtd_format"] > FORMAT_VERSION:
        raise InputError(f"'{path}' has format {obj['ddtd_format']}; this ddtd reads up to {FORMAT_VERSION}",
                         hint="upgrade ddtd")
    model = build_from_spec(obj.get("spec"), trust_factory=trust_factory, where=f"model file '{path}'")
    try:
        if obj.get("replacements"):
            from .layers import apply_replacements

            model = apply_replacements(model, obj["replacements"], inplace=True)
        model.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise InputError(f"model file '{path}' is damaged or does not match its architecture "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                         hint="re-create the file with ddtd compress") from exc
    model.ddtd_spec = obj["spec"]
    model.ddtd_records = list(obj.get("replacements") or [])  # how it was made: a further compression adds to them
    return model


def save_model(model: nn.Module, path: str | os.PathLike, spec: ModelSpec | None = None, **extra) -> None:
    """Write a ddtd model file atomically: format version, spec, state dict and ``extra`` data."""
    spec = spec or getattr(model, "ddtd_spec", None)
    if spec is None:
        raise InputError(
            "the model has no architecture spec, so it cannot be rebuilt at load time",
            hint="load it with ddtd.load_model(...) or pass spec={'source': ..., 'name': ..., 'kwargs': ...}",
        )
    payload = {
        "ddtd_format": FORMAT_VERSION,
        "ddtd_version": __version__,
        "spec": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model_file_meta(path: str | os.PathLike) -> dict:
    """Everything in a ddtd model file except the weights (report, plan, transform...)."""
    path = Path(path)
    if not path.is_file() or _is_torchscript(path):
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}
    if not isinstance(obj, dict) or "ddtd_format" not in obj:
        return {}
    return {k: v for k, v in obj.items() if k != "state_dict"}
