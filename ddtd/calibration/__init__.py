"""Calibration: hook Conv2d / Linear layers, accumulate input moments, store them in HDF5."""

from .collector import DEFAULT_MAX_DIM, InputCapture, LayerHooks, LayerMoments, MomentCollector, select_layers
from .moments import ConvGeometry, conv_geometry, conv_input_moments, linear_input_moments, unfold_patches
from .run import CalibrationResult, calibrate, save_calibration
from .store import CovarianceStore, StoreInfo, merge_stores, model_layers, write_store

__all__ = [
    "DEFAULT_MAX_DIM",
    "CalibrationResult",
    "ConvGeometry",
    "CovarianceStore",
    "InputCapture",
    "LayerHooks",
    "LayerMoments",
    "MomentCollector",
    "StoreInfo",
    "calibrate",
    "conv_geometry",
    "conv_input_moments",
    "linear_input_moments",
    "merge_stores",
    "model_layers",
    "save_calibration",
    "select_layers",
    "unfold_patches",
    "write_store",
]
