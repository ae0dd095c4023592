"""ddtd: compress trained PyTorch models after training, with tensor decompositions fitted to
the data each layer sees (the Sigma norm), and no fine-tuning.

Importing ddtd has no side effects; heavy submodules load on first use.
"""

from ._version import __version__
from .errors import DdtdError, InputError, NumericalError, StoreMismatchError

__all__ = [
    "__version__",
    "DdtdError",
    "InputError",
    "NumericalError",
    "StoreMismatchError",
    "calibrate",
    "compress",
    "plan",
    "solve",
    "assemble",
    "load",
    "load_model",
    "save_model",
    "CovarianceStore",
]


def __getattr__(name):  # lazy public API
    if name in {"calibrate", "CovarianceStore"}:
        from . import calibration

        return getattr(calibration, name)
    if name in {"load_model", "save_model", "load"}:
        from . import model_io

        return getattr(model_io, "load_model" if name == "load" else name)
    if name in {"compress", "plan", "solve", "assemble"}:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ddtd' has no attribute {name!r}")
