"""Error types. Every ddtd error says what went wrong *and* what to do next."""

from __future__ import annotations


class DdtdError(Exception):
    """Base class for errors a user can act on.

    ``hint`` is the next step the user should take; it is appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  next step: {hint}")


class InputError(DdtdError):
    """Bad user input: a missing / empty / corrupt file or folder, an impossible option."""


class StoreMismatchError(DdtdError):
    """A covariance store that does not belong to the model it is used with."""


class NumericalError(DdtdError):
    """NaN / Inf in activations, or a solver that diverged; names the layer."""


def layer_label(name: str | None) -> str:
    """How messages name a layer: ``layer 'features.3.conv'`` (``layer <unnamed>`` without a name)."""
    return f"layer '{name}'" if name else "layer <unnamed>"
