"""Replacement layers built from decomposition factors, and model surgery.

* :mod:`ddtd.layers.builders`: factor -> ``nn.Sequential`` chains of plain ``nn.Conv2d`` /
  ``nn.Linear`` (svd, tucker2, cp3, cp4, the TT convolution, dense; :mod:`ddtd.layers.tt`: the
  TT-matrix module for Linear / 1x1 layers), dense weights from factors, parameter and
  multiply-add counts.
* :mod:`ddtd.layers.surgery`: get / set sub-modules by qualified name, BatchNorm folding.
* :mod:`ddtd.layers.attention`: ``nn.MultiheadAttention`` rewritten with ``nn.Linear``
  projections, so they can be calibrated and compressed like any Linear layer.
* :mod:`ddtd.layers.records`: plain-data records of replacements, replayed on a fresh
  architecture so that a state dict loaded with ``weights_only=True`` restores the model.
"""

from .builders import (BUILDERS, FORMATS, build, build_cp3, build_cp4, build_dense, build_svd, build_tt,
                       build_tucker2, count_macs, count_params, cp3_kernel, cp4_kernel,
                       dense_forward, factor_shapes, factorized_weight, format_applies, layer_dims, macs_by_layer, svd_weight,
                       tucker2_kernel)
from .attention import ProjectedAttention, split_attention
from .merge import merge_compressed, merged_layer
from .tt import TTMatrix
from .records import (KINDS, apply_replacements, describe_fold, describe_replacement, describe_split,
                      fold_records, layer_spec, replace_layer)
from .surgery import find_conv_bn_pairs, fold_batchnorm, fold_conv_bn, get_module, set_module

__all__ = [
    "BUILDERS", "FORMATS", "KINDS", "build", "build_svd", "build_tucker2", "build_cp3",
    "build_cp4", "build_tt", "TTMatrix", "build_dense", "factorized_weight", "svd_weight", "tucker2_kernel",
    "cp3_kernel", "cp4_kernel", "dense_forward", "factor_shapes", "count_params", "count_macs",
    "macs_by_layer", "layer_dims", "format_applies", "get_module", "set_module", "find_conv_bn_pairs", "fold_conv_bn",
    "fold_batchnorm", "layer_spec", "describe_replacement", "describe_fold", "fold_records",
    "replace_layer", "apply_replacements", "describe_split", "ProjectedAttention", "split_attention", "merge_compressed", "merged_layer",
]
