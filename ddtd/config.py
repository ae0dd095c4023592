"""The typed configuration of a compression: one validated dataclass tree.

:class:`CompressConfig` gathers what :func:`ddtd.compress` needs besides the model and the data:

* ``method``: the per-method config (:mod:`ddtd.methods`: :class:`~ddtd.methods.SvdConfig`,
  :class:`~ddtd.methods.Tucker2Config`, :class:`~ddtd.methods.CPConfig`,
  :class:`~ddtd.methods.StableCPConfig`, :class:`~ddtd.methods.LRSConfig`,
  :class:`~ddtd.methods.SparseConfig` or :class:`~ddtd.methods.AutoConfig`);
* ``size``: :class:`Size`, the size request (a whole-model ratio, ranks, an error budget or a
  fidelity target) and how a whole-model budget is counted and spread;
* ``calibration``: :class:`CalibrationConfig`, how calibration inputs are read and sampled;
* ``norm``: ``"sigma"`` (fit the output error on the calibration data) or ``"frobenius"``
  (fit the weights: the baseline);
* ``sequential``: ``"auto"``, ``"on"`` or ``"off"`` (see :mod:`ddtd.sequential`);
* ``device``: where the work runs (``None``: where the model is);
* ``stages``: reach ``size.ratio`` in this many compressions of geometric ratios, each
  recalibrated on the model the previous one produced (its chains merged and re-fitted at lower
  ranks, so the number of layers does not grow).

Every dataclass validates itself in ``__post_init__`` and raises :class:`ddtd.InputError` with a
hint, so a bad request fails before any calibration starts. The image-sample seed
(``calibration.seed``) and the solvers' seed (the method config's ``seed``) are separate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .methods import AutoConfig, MethodConfig
from .ranks import check_rank_request

__all__ = ["CompressConfig", "Size", "CalibrationConfig", "config_from_options", "OPTION_GROUPS", "NORMS", "BUDGETS", "STRATEGIES", "ALLOCATIONS", "SCOPES",
           "SEQUENTIAL_MODES"]

NORMS = ("sigma", "frobenius")
#: What a whole-model ratio counts: ``both`` parameters, with no layer allowed more multiply-adds
#: than its dense original; ``params`` parameters alone (bytes only: low rank + sparse, which runs
#: a dense layer, may be chosen); ``flops`` multiply-adds.
BUDGETS = ("both", "params", "flops")
#: How a whole-model budget is spread: ``global`` where the error per parameter saved is
#: smallest, ``uniform`` the same ratio everywhere, ``vbmf`` each layer's empirical variational
#: Bayes rank (Nakajima et al., "Global analytic solution of fully-observed variational Bayesian
#: matrix factorization", JMLR 2013).
STRATEGIES = ("global", "uniform", "vbmf")
#: How ``global`` compares layers in the Sigma norm (:mod:`ddtd.sensitivity`).
ALLOCATIONS = ("sensitivity", "relative")
#: What a whole-model ratio is a ratio of: the whole ``model`` (every parameter, embedding tables
#: and norms included) or the compressible ``layers`` alone (the Conv2d / Linear layers the filter
#: selects, the usual measure for transformers whose embeddings no low-rank format shrinks).
SCOPES = ("model", "layers")
SEQUENTIAL_MODES = ("auto", "on", "off")


def _choice(value, allowed, what: str) -> None:
    if value not in allowed:
        raise InputError(f"unknown {what} {value!r}", hint="use one of " + ", ".join(map(repr, allowed)))


def _in_range(value, ok, what: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise InputError(f"{what} {value!r} is out of range", hint=hint)


@dataclass(frozen=True)
class Size:
    """How small: exactly one of ``ratio``, ``rank``, ``ranks``, ``error`` or a fidelity target
    (``min_agreement`` and / or ``max_output_error``); none at all only with ``strategy="vbmf"``.

    Attributes:
        ratio: whole-model compression ratio (> 1), counted as ``budget`` says.
        rank: every layer's rank: an ``int``, ``(R1, R2)`` for tucker2 (an ``int`` R means
            ``(R, R)``), or a ``float`` > 1 (a per-layer ratio).
        ranks: per-layer ranks ``{name: rank}``; layers not named stay dense.
        error: per-layer relative Sigma error budget in (0, 1).
        min_agreement / max_output_error: the largest whole-model ratio whose top-1 agreement
            with the original on held-out calibration inputs is at least ``min_agreement`` (and
            / or whose relative output error is at most ``max_output_error``).
        budget: :data:`BUDGETS`; strategy: :data:`STRATEGIES`; allocation: :data:`ALLOCATIONS`;
            scope: :data:`SCOPES`.
    """

    ratio: float | None = None
    rank: Any = None
    ranks: dict | None = None
    error: float | None = None
    min_agreement: float | None = None
    max_output_error: float | None = None
    budget: str = "both"
    strategy: str = "global"
    allocation: str = "sensitivity"
    scope: str = "model"

    def __post_init__(self):
        _choice(self.budget, BUDGETS, "budget")
        _choice(self.scope, SCOPES, "ratio scope")
        _choice(self.strategy, STRATEGIES, "rank strategy")
        _choice(self.allocation, ALLOCATIONS, "allocation")
        given = [k for k in ("ratio", "rank", "ranks", "error") if getattr(self, k) is not None]
        if self.target:
            given.append("fidelity target")
        if len(given) > 1:
            raise InputError(f"give one size, got {' and '.join(given)}",
                             hint="e.g. Size(ratio=4), or Size(min_agreement=0.95) to let the target choose the ratio")
        if not given and self.strategy != "vbmf":
            raise InputError("no size given", hint="give ratio, rank, ranks, error or min_agreement "
                                                   "(e.g. Size(ratio=4)), or strategy='vbmf'")
        if self.ratio is not None:
            _in_range(self.ratio, lambda v: 1 < v < math.inf, "ratio", "a finite number > 1, e.g. 4")
        if self.rank is not None:
            object.__setattr__(self, "rank", check_rank_request(self.rank))
        if self.ranks is not None and not isinstance(self.ranks, dict):
            raise InputError(f"ranks must map layer names to ranks, got {type(self.ranks).__name__}",
                             hint='e.g. {"layer1.0.conv1": 16}')
        if self.error is not None:
            _in_range(self.error, lambda v: 0 < v < 1, "error", "a relative Sigma error in (0, 1), e.g. 0.05")
        if self.min_agreement is not None:
            _in_range(self.min_agreement, lambda v: 0 < v <= 1, "min_agreement", "a fraction in (0, 1], e.g. 0.95")
        if self.max_output_error is not None:
            _in_range(self.max_output_error, lambda v: v > 0, "max_output_error", "a number > 0, e.g. 0.2")

    @property
    def target(self) -> bool:
        """A fidelity target rather than a size."""
        return self.min_agreement is not None or self.max_output_error is not None


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration inputs are read.

    Attributes:
        transform: preprocessing of an image folder (:class:`ddtd.data.ImageTransform`; default
            224 px, ImageNet mean / std, the model's input channels). Ignored for tensors and
            DataLoaders, which are used as they are.
        num_images: use this many inputs (default: all).
        seed: seed of the reproducible image sample (the solvers have their own).
        batch_size: inputs per forward pass (default: 32 at 224 px, scaled by pixel count).
        holdout: share of the inputs held out of every fit to measure fidelity (at least 4 when
            16 or more are given; 0: none).
        input_shape: ``(C, H, W)`` of one input, needed when compressing from a store alone.
        show_progress: progress bars (default: when attached to a terminal).
        forward: ``forward(model, batch)`` for batches the model is not called on as they are
            (default: ``model(x)``, ``model(*batch)`` or ``model(**batch)``, see :mod:`ddtd.inputs`).
        mask: ``mask(batch) -> (B, L)`` token mask (True for tokens, False for padding) excluded
            from every statistic of Linear layers on ``(B, L, d)`` inputs (default: a dict
            batch's ``attention_mask``).
    """

    transform: Any = None
    num_images: int | None = None
    seed: int = 0
    batch_size: int | None = None
    holdout: float = 0.125
    input_shape: tuple | None = None
    show_progress: bool | None = None
    forward: Any = None
    mask: Any = None

    def __post_init__(self):
        for k, f in (("forward", self.forward), ("mask", self.mask)):
            if f is not None and not callable(f):
                raise InputError(f"{k} must be a callable, got {type(f).__name__}",
                                 hint=f"e.g. {k}=lambda model, batch: model(batch['x'])" if k == "forward"
                                 else "e.g. mask=lambda batch: batch['attention_mask']")
        for k in ("num_images", "batch_size"):
            v = getattr(self, k)
            if v is not None:
                _in_range(v, lambda x: x >= 1 and float(x).is_integer(), k, "a whole number >= 1")
        _in_range(self.holdout, lambda v: 0 <= v < 1, "holdout", "a fraction in [0, 1), e.g. 0.125")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                raise InputError(f"input_shape must be positive ints, got {self.input_shape!r}", hint="e.g. (3, 224, 224)")
            object.__setattr__(self, "input_shape", shape)


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`ddtd.compress` needs besides the model and the data (see the module
    docstring). The defaults compress 2x by parameters with ``auto`` in the Sigma norm."""

    method: MethodConfig | AutoConfig = field(default_factory=AutoConfig)
    size: Size = field(default_factory=lambda: Size(ratio=2.0))
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    norm: str = "sigma"
    sequential: str = "auto"
    device: Any = None
    stages: int = 1

    def __post_init__(self):
        _choice(self.norm, NORMS, "norm")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise InputError(f"stages must be an int >= 1, got {self.stages!r}", hint="e.g. stages=3")
        if self.stages > 1 and self.size.ratio is None:
            raise InputError("compressing in stages needs a whole-model ratio", hint="e.g. Size(ratio=4), stages=3")
        if self.sequential is True or self.sequential is False:
            object.__setattr__(self, "sequential", "on" if self.sequential else "off")
        _choice(self.sequential, SEQUENTIAL_MODES, "sequential mode")
        if not isinstance(self.method, (MethodConfig, AutoConfig)):
            raise InputError(f"method must be a method config, got {self.method!r}",
                             hint="e.g. SvdConfig(), AutoConfig(), CPConfig('cp3') (ddtd.methods)")
        if not isinstance(self.size, Size):
            raise InputError(f"size must be a Size, got {self.size!r}", hint="e.g. Size(ratio=4)")
        if not isinstance(self.calibration, CalibrationConfig):
            raise InputError(f"calibration must be a CalibrationConfig, got {self.calibration!r}")

    @property
    def method_name(self) -> str:
        return self.method.name


#: The flat option names :func:`config_from_options` accepts, by the part of the tree they set.
OPTION_GROUPS = {
    "size": ("ratio", "rank", "ranks", "error", "min_agreement", "max_output_error", "budget", "strategy",
             "allocation", "scope"),
    "calibration": ("transform", "num_images", "seed", "batch_size", "holdout", "input_shape", "show_progress"),
    "top": ("norm", "sequential", "device", "stages"),
    "method": ("method", "max_iter", "tol", "solver_seed", "damping", "bias_correction", "stabilize", "sparsity",
               "lrs_init", "stable_finish", "probe_iters"),
}


def _method_from_options(opts: dict):
    """The method config named by ``opts["method"]`` (default ``auto``) with the solver settings
    of ``opts`` applied wherever the config has them."""
    from .methods import default_config, with_settings

    config = default_config(opts.get("method", "auto"))
    settings = {k: opts[k] for k in ("max_iter", "tol", "damping", "bias_correction", "sparsity") if k in opts}
    if "solver_seed" in opts:
        settings["seed"] = opts["solver_seed"]
    if "lrs_init" in opts:
        settings["init"] = opts["lrs_init"]
    if "stable_finish" in opts:
        settings["finish"] = opts["stable_finish"]
    if isinstance(config, AutoConfig):
        from dataclasses import replace

        config = replace(config, stabilize=opts.get("stabilize", True),
                         probe_iters=opts.get("probe_iters", config.probe_iters) or None)
        lrs_only = {k: settings.pop(k) for k in ("sparsity", "init") if k in settings}
        config = with_settings(config, **settings)
        return replace(config, lrs=with_settings(config.lrs, **lrs_only))
    if "init" in settings and config.name != "lrs":
        settings.pop("init")
    return with_settings(config, **settings)


def config_from_options(**options) -> CompressConfig:
    """A :class:`CompressConfig` from flat options, the names of ``ddtd compress``'s flags
    (``ratio=4, method="svd", max_iter=25, seed=0, ...``; see :data:`OPTION_GROUPS`). Options
    left out keep their defaults; ``None`` counts as left out. The CLI builds its config here."""
    opts = {k: v for k, v in options.items() if v is not None}
    known = {k for group in OPTION_GROUPS.values() for k in group}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}", hint="use " + ", ".join(sorted(known)))
    pick = lambda group: {k: opts[k] for k in OPTION_GROUPS[group] if k in opts}  # noqa: E731
    size = pick("size")
    if not any(k in size for k in ("ratio", "rank", "ranks", "error", "min_agreement", "max_output_error")) \
            and size.get("strategy") != "vbmf":
        size["ratio"] = 2.0
    return CompressConfig(method=_method_from_options(opts), size=Size(**size),
                          calibration=CalibrationConfig(**pick("calibration")), **pick("top"))
