"""ddtd: compress trained PyTorch models after training, with tensor decompositions fitted to
the data each layer sees (the Sigma norm), and no fine-tuning.

    import ddtd
    config = ddtd.CompressConfig(method=ddtd.SvdConfig(), size=ddtd.Size(ratio=4))
    result = ddtd.compress(model, "calib/images", config)

Importing ddtd has no side effects; heavy submodules load on first use.
"""

from ._version import __version__
from .errors import DdtdError, InputError, NumericalError, StoreMismatchError

_LAZY = {
    "calibrate": "calibration", "CovarianceStore": "calibration",
    "load_model": "model_io", "save_model": "model_io", "load": "model_io",
    "compress": "pipeline", "prepare": "pipeline", "assemble": "pipeline",
    "plan": "planning", "solve": "fitting", "LayerData": "fitting",
    "CompressConfig": "config", "Size": "config", "CalibrationConfig": "config",
    "config_from_options": "config",
    "MethodConfig": "methods", "SvdConfig": "methods", "Tucker2Config": "methods", "CPConfig": "methods",
    "StableCPConfig": "methods", "LRSConfig": "methods", "SparseConfig": "methods", "AutoConfig": "methods",
    "layer_filter": "selection", "ImageTransform": "data",
    "Report": "report", "LayerReport": "report", "CompressResult": "report",
}

__all__ = ["__version__", "DdtdError", "InputError", "NumericalError", "StoreMismatchError", *_LAZY]


def __getattr__(name):  # lazy public API
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, "load_model" if name == "load" else name)
    raise AttributeError(f"module 'ddtd' has no attribute {name!r}")
