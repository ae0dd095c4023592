"""Model inputs of any kind: one batch is a tensor, a tuple / list of them or a dict of them.

A batch is how the model is called:

* a tensor ``x`` -> ``model(x)`` (any dtype: integer token ids stay integer);
* a tuple / list ``(a, b, ...)`` -> ``model(a, b, ...)`` (positional arguments);
* a dict ``{"input_ids": ..., "attention_mask": ...}`` -> ``model(**batch)`` (keyword arguments,
  e.g. a tokenizer's output);
* anything else through ``forward(model, batch)``, a callable the caller supplies.

Every tensor whose first dim is the batch size is split along it (samples); other values (other
tensors, flags) are passed through unchanged. Batches are never concatenated, so batches of
different sequence lengths are fine.

**Masks.** For inputs of shape ``(B, L, d)`` to a ``Linear`` layer, the ``(B, L)`` mask of the
batch marks the positions that count (True / 1) and padding (False / 0): the
``attention_mask`` of a dict batch, or what ``mask(batch)`` returns when the caller supplies it.
"""

from __future__ import annotations

import inspect

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .errors import InputError

__all__ = ["call_model", "to_device", "batch_size", "take", "token_mask", "output_tensor", "split_batches",
           "first_samples", "count", "example_of", "unpack_loader_batch", "positional_arity", "rebatch", "Feed", "map_tensors", "is_shape", "probe_input"]

Batch = Any


def _tensors(batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for t in batch if isinstance(t, torch.Tensor)]
    if isinstance(batch, Mapping):
        return [t for t in batch.values() if isinstance(t, torch.Tensor)]
    return []


def batch_size(batch: Batch) -> int:
    """The number of samples: the first dim of the batch's first tensor."""
    ts = _tensors(batch)
    if not ts or ts[0].dim() == 0:
        raise InputError(f"cannot tell the batch size of a {type(batch).__name__}",
                         hint="give tensors with a leading batch dim (a tensor, a tuple / list or a dict of them)")
    return int(ts[0].shape[0])


def map_tensors(batch, fn):
    """``batch`` with ``fn`` applied to every tensor (structure kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple):
        return tuple(map_tensors(t, fn) for t in batch)
    if isinstance(batch, list):
        return [map_tensors(t, fn) for t in batch]
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def to_device(batch: Batch, device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (dtypes unchanged)."""
    return map_tensors(batch, lambda t: t.to(device))


def take(batch: Batch, index: torch.Tensor | slice) -> Batch:
    """The samples ``index`` of ``batch``: every tensor whose first dim is the batch size is
    indexed along it; the rest passes through."""
    n = batch_size(batch)
    return map_tensors(batch, lambda t: t[index] if t.dim() > 0 and t.shape[0] == n else t)


def call_model(model: nn.Module, batch: Batch, forward: Callable | None = None):
    """Run ``model`` on one batch (see the module docstring)."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise InputError(f"cannot call the model on a {type(batch).__name__}",
                     hint="give tensors, tuples / lists or dicts of tensors, or a forward(model, batch) callable")


def token_mask(batch: Batch, mask: Callable | None = None) -> torch.Tensor | None:
    """The ``(B, L)`` boolean mask of the positions that count (``mask(batch)``, else a dict
    batch's ``attention_mask``), or ``None``."""
    m = mask(batch) if mask is not None else (batch.get("attention_mask") if isinstance(batch, Mapping) else None)
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dim() != 2:
        raise InputError(f"a token mask must be a (batch, length) tensor, got {getattr(m, 'shape', type(m))}",
                         hint="return the attention mask of the batch: 1 for tokens, 0 for padding")
    return m.bool()


def output_tensor(out) -> torch.Tensor:
    """The tensor to compare in a model's output: the output itself, a ``logits`` /
    ``last_hidden_state`` entry of a dict-like output (Hugging Face ``ModelOutput``), else its
    first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        for key in ("logits", "last_hidden_state"):
            if key in out.keys() and isinstance(out[key], torch.Tensor):
                return out[key]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for t in out:
            if isinstance(t, torch.Tensor):
                return t
    raise InputError(f"the model returned a {type(out).__name__} with no tensor in it",
                     hint="pass forward=lambda model, batch: <a tensor> to say which output to compare")


def positional_arity(model: nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` takes (``None`` when it takes ``*args`` or
    cannot be inspected)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def unpack_loader_batch(batch: Batch, arity: int | None = None) -> Batch:
    """A DataLoader item as model input. An ``(inputs, targets)`` pair gives its inputs when the
    second item is a tensor of the same batch size and either the model takes one positional input
    (``arity == 1``, :func:`positional_arity`) or the second item is 1-D integer labels; anything
    else is the input itself (a tuple: positional arguments)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)
            and batch[1].dim() >= 1):
        return batch
    labels = batch[1].dim() == 1 and not batch[1].is_floating_point()
    if arity != 1 and not labels:
        return batch
    try:
        return batch[0] if batch_size(batch[0]) == batch[1].shape[0] else batch
    except InputError:
        return batch


def count(batches: list) -> int:
    return sum(batch_size(b) for b in batches)


def split_batches(batches: list, fraction: float, seed: int, min_held: int = 4) -> tuple[list, list]:
    """Every batch split into the samples kept and a held-out share ``fraction`` of all samples
    (a seeded random subset, at least ``min_held``), without concatenating batches."""
    sizes = [batch_size(b) for b in batches]
    n = sum(sizes)
    n_h = max(min_held, int(round(n * fraction)))
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[n - n_h:]] = True
    keep_out, held_out, start = [], [], 0
    for b, s in zip(batches, sizes):
        h = held[start:start + s]
        start += s
        if (~h).any():
            keep_out.append(take(b, (~h).nonzero().squeeze(1)))
        if h.any():
            held_out.append(take(b, h.nonzero().squeeze(1)))
    return keep_out, held_out


def first_samples(batches: list, n: int) -> list:
    """The batches holding the first ``n`` samples (the last one cut)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        s = batch_size(b)
        out.append(b if s <= left else take(b, slice(0, left)))
        left -= s
    return out


def example_of(batch: Batch) -> Batch:
    """One sample of ``batch`` (batch size 1), for shape probing."""
    return take(batch, slice(0, 1))


def is_shape(x) -> bool:
    """A shape ``(C, H, W)`` (ints) rather than an example batch."""
    return isinstance(x, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in x)


def probe_input(input_shape) -> Any:
    """What shape probing feeds: a zero batch of one ``input_shape`` (a shape: ``(1, *shape)``), or
    the example batch itself."""
    return (1, *input_shape) if is_shape(input_shape) else input_shape


def rebatch(batches: list, size: int) -> list:
    """Plain tensor batches of one shape cut again into batches of ``size`` (the order kept);
    any other batches are returned as they are (never concatenated)."""
    if batches and all(isinstance(b, torch.Tensor) for b in batches) \
            and len({tuple(b.shape[1:]) for b in batches}) == 1 and len({b.dtype for b in batches}) == 1:
        return list(torch.cat(batches).split(size))
    return list(batches)


class Feed:
    """How batches reach the model: the ``device``, the optional ``forward(model, batch)`` and
    ``mask(batch)`` callables (:class:`ddtd.config.CalibrationConfig`)."""

    def __init__(self, device, forward: Callable | None = None, mask: Callable | None = None):
        self.device, self.forward, self.mask = device, forward, mask

    def run(self, model: nn.Module, batch: Batch):
        """``model`` on ``batch`` (moved to the device): its output tensor and the token mask."""
        batch = to_device(batch, self.device)
        return output_tensor(call_model(model, batch, self.forward)), token_mask(batch, self.mask)
