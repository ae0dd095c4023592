"""Which layers to compress: filters ``filter_fn(name, module) -> bool``.

The default (:func:`layer_filter` with no patterns) takes every ``nn.Conv2d`` / ``nn.Linear``
except the model's input layer (few channels, little to gain, sensitive; when the model starts
with an embedding table, its first Linear is not the input layer) and its final classifier (a low
rank there costs classes). Any callable ``(name, module) -> bool`` may be passed to
:func:`ddtd.compress` instead; layers it rejects stay dense.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .calibration import select_layers

__all__ = ["LayerFilter", "layer_filter", "compressible_layers", "why_excluded"]

FilterFn = Callable[[str, nn.Module], bool]


def compressible_layers(model: nn.Module) -> list[str]:
    """Qualified names of the model's ``nn.Conv2d`` / ``nn.Linear`` layers, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _first_weighted_leaf(model: nn.Module) -> str | None:
    """The first module (in module order) holding weights of its own: the model's input layer
    (an ``nn.Embedding`` for a token model, whose first Linear is then an ordinary layer)."""
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) and not any(True for _ in m.children()):
            return name
    return None


class LayerFilter:
    """A filter built from glob patterns (see :func:`ddtd.calibration.select_layers`) with the
    input layer and the final classifier left out unless included or named exactly. Callable as
    ``filter_fn(name, module)``; :meth:`reason` says why a layer is left out."""

    def __init__(self, model: nn.Module, patterns: str | list[str] | None = None, *,
                 include_first: bool = False, include_last: bool = False):
        names = compressible_layers(model)
        self.patterns = patterns
        self.selected = set(select_layers(model, patterns)) if patterns else set(names)
        self.excluded: dict[str, str] = {}
        if names and not include_first and names[0] == _first_weighted_leaf(model):
            self.excluded[names[0]] = "input layer (few channels, little to gain, sensitive)"
        if names and not include_last and isinstance(dict(model.named_modules())[names[-1]], nn.Linear):
            self.excluded[names[-1]] = "final classifier (a low rank here costs classes)"
        exact = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns or [])]
        for name in exact:  # a layer named exactly is wanted
            self.excluded.pop(name, None)

    def __call__(self, name: str, module: nn.Module) -> bool:
        return name in self.selected and name not in self.excluded

    def reason(self, name: str) -> str:
        return self.excluded.get(name, "not selected by the layer patterns")


def layer_filter(model: nn.Module, patterns: str | list[str] | None = None, *, include_first: bool = False,
                 include_last: bool = False) -> LayerFilter:
    """The filter of ``ddtd compress --layers PATTERNS [--include-first] [--include-last]``."""
    return LayerFilter(model, patterns, include_first=include_first, include_last=include_last)


def why_excluded(filter_fn: FilterFn, name: str) -> str:
    """The reason a filter gives for leaving ``name`` out (a plain callable: ``filter_fn``'s choice)."""
    reason = getattr(filter_fn, "reason", None)
    return reason(name) if callable(reason) else "left out by filter_fn"
