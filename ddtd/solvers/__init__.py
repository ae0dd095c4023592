"""Per-layer solvers: pure functions on tensors (weight, Sigma or None, rank) -> factors.

Every solver minimises ``trace((W - W~) Sigma (W - W~)^T)`` (``Sigma = I`` when ``sigma`` is
``None``) and reports *relative squared* errors ``err / trace(W Sigma W^T)``.  See the module
docstrings for the maths, :mod:`ddtd.solvers.formats` for parameter counts.

Public functions:

* :func:`sigma_svd` / :func:`sigma_svd_cross` -> :class:`SVDResult` (``W~ = A @ B``)
* :func:`tucker2` -> :class:`Tucker2Result` (``U``, ``core``, ``V``)
* :func:`cp_als`, :func:`cp3`, :func:`cp4` -> :class:`CPResult` (``A``, ``B``, ``C``, ``E``)
* :func:`tt_conv` -> :class:`TTConvResult` (``C``, ``Y``, ``X``, ``T``), :func:`tt_matrix` ->
  :class:`TTMatrixResult` (``cores``); :func:`tt_svd` / :func:`tt_matrix_svd` (Frobenius TT-SVD)

``SOLVERS`` maps a format name to its solver; all share the call
``SOLVERS[fmt](weight, sigma, rank, **options)``.

One damping rule (:func:`default_damping`): every solver fits ``Sigma + damping *
mean(diag(Sigma)) * I`` with ``damping`` defaulting to :data:`DAMPING` (``1e-3``), the Sigma-SVD
to ``0``.  Every result has an ``info`` dict with ``damping``, ``norm_ratio`` and
``identity_error`` (:func:`fit_diagnostics`); :func:`norm_growth_warning` turns a norm ratio above
:data:`NORM_GROWTH_WARN` into a message for the caller's log.
"""

from ._common import DAMPING, NORM_GROWTH_WARN, damp, default_damping, fit_diagnostics, norm_growth_warning
from ._common import eigh
from .cp import CPResult, cp3, cp4, cp_als, khatri_rao
from .formats import FORMATS, param_count, rank_for_budget, rank_for_ratio
from .svd import SVDResult, sigma_svd, sigma_svd_cross
from .tucker2 import Tucker2Result, tucker2
from .tt import TTConvResult, TTMatrixResult, tt_conv, tt_full, tt_matrix, tt_matrix_svd, tt_svd
from .stable_cp import StableCPResult, balance, ellipsoid_least_norm, sensitivity, stable_cp, stable_cp3, stable_cp4
from .lrs import LRSResult, lowrank_sparse, magnitude_prune, sigma_prune, solve_rows, split_budget, storage_units

SOLVERS = {
    "svd": sigma_svd,
    "tucker2": tucker2,
    "cp3": cp3,
    "cp4": cp4,
    "tt": lambda weight, sigma, rank, **kw: (
        tt_conv(weight, sigma, rank, **kw) if weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1
        else tt_matrix(weight, sigma, rank, **kw)),
}

__all__ = [
    "eigh",
    "CPResult", "SVDResult", "Tucker2Result", "SOLVERS", "FORMATS",
    "cp3", "cp4", "cp_als", "khatri_rao", "sigma_svd", "sigma_svd_cross", "tucker2",
    "param_count", "rank_for_budget", "rank_for_ratio",
    "StableCPResult", "balance", "ellipsoid_least_norm", "sensitivity", "stable_cp", "stable_cp3", "stable_cp4",
    "LRSResult", "lowrank_sparse", "magnitude_prune", "sigma_prune", "solve_rows", "split_budget",
    "storage_units", "DAMPING", "damp", "NORM_GROWTH_WARN", "default_damping", "fit_diagnostics",
    "norm_growth_warning", "TTConvResult", "TTMatrixResult", "tt_conv", "tt_matrix", "tt_svd", "tt_matrix_svd",
    "tt_full",
]
