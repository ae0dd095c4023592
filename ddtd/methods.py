"""Compression methods: one validated config per method, and a registry name -> solver + builder.

A *method* turns one layer's weight and input covariance into factors (a pure solver from
:mod:`ddtd.solvers`) and factors into modules (a builder from :mod:`ddtd.layers`). Each method
has one validated config dataclass (``SvdConfig``, ``Tucker2Config``, ``CPConfig``,
``StableCPConfig``, ``LRSConfig``, ``SparseConfig``, ``TTConfig``; ``AutoConfig`` compares several), registered
in :data:`METHODS` with its solver and the layer format it builds. Every solver is given the
covariance (the Sigma norm) or ``None`` (the Frobenius norm, the baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, ClassVar

import torch
from torch import nn

from .errors import InputError
from .layers import FORMATS, format_applies, layer_dims
from .solvers import cp_als, damp, default_damping, sigma_svd, tt_conv, tt_matrix, tucker2
from .solvers.formats import tt_matrix_modes, tt_params, tt_rank_for_budget

__all__ = ["MethodConfig", "SvdConfig", "Tucker2Config", "CPConfig", "StableCPConfig", "LRSConfig", "SparseConfig", "TTConfig",
           "AutoConfig", "Method", "Fit", "METHODS", "get_method", "applicable", "relative_sigma_error",
           "with_settings", "method_configs", "default_config", "stable_version"]


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Settings every method shares; each method has its own subclass (one registered config per
    method). ``name`` is the registered method's name.

    Attributes:
        damping: ``Sigma`` is damped by ``damping * mean(diag(Sigma)) * I`` before fitting;
            ``None``: :func:`ddtd.solvers.default_damping` (0 for svd, 1e-3 for the others:
            ALS / sparse normal equations leave the directions the data never excites free,
            where the factors can grow and amplify inputs unlike the calibration set;
            benchmarks/results/solvers.txt has the measurements).
        bias_correction: move the bias to ``b + (W - W~) mu`` (exact mean output); ``None``: on
            for the Sigma norm, off for the Frobenius baseline (which uses no data).
    """

    damping: float | None = None
    bias_correction: bool | None = None

    name: ClassVar[str] = ""

    def for_layer(self, layer: nn.Module) -> "MethodConfig":
        """This config as it applies to ``layer`` (a method whose options depend on the layer's
        geometry overrides it; the weight alone does not show padding or stride)."""
        return self

    def __post_init__(self):
        if self.damping is not None and not 0 <= self.damping < 1:
            raise InputError(f"damping must be in [0, 1), got {self.damping}", hint="e.g. 1e-3")
        iters = getattr(self, "iters", None)
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
            raise InputError(f"{self.name}: iters must be an int >= 0, got {iters!r}")
        for k in ("max_iter", "split_iter", "max_sweeps", "direct_max"):
            v = getattr(self, k, None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{self.name}: {k} must be an int >= 1, got {v!r}")
        for k in ("tol", "sweep_tol"):
            v = getattr(self, k, None)
            if v is not None and not v >= 0:
                raise InputError(f"{self.name}: {k} must be >= 0, got {v!r}")

    def damping_for(self) -> float:
        """The damping this method's solver applies (see ``damping``)."""
        return self.damping if self.damping is not None else default_damping(self.name)


@dataclass(frozen=True)
class SvdConfig(MethodConfig):
    """Sigma-SVD (closed form): ``W ~ A B``, a conv with the original kernel to ``r`` channels,
    then a 1x1 conv (or two Linear layers)."""

    name: ClassVar[str] = "svd"


@dataclass(frozen=True)
class Tucker2Config(MethodConfig):
    """Tucker2-ALS in the Sigma norm: 1x1 to ``R2``, ``k x k`` ``R2 -> R1``, 1x1 to ``T``.
    ``init``: ``"whitened"`` (HOSVD of the Sigma-whitened kernel), ``"hosvd"`` or ``"random"``."""

    max_iter: int = 50
    tol: float = 1e-5
    seed: int = 0
    init: str = "whitened"

    name: ClassVar[str] = "tucker2"


@dataclass(frozen=True)
class CPConfig(MethodConfig):
    """CP-ALS in the Sigma norm. ``layout``: ``"cp3"`` (1x1 to R, depthwise ``k x k``, 1x1 to
    T) or ``"cp4"`` (1x1, depthwise ``k x 1``, depthwise ``1 x k``, 1x1)."""

    layout: str = "cp3"
    max_iter: int = 50
    tol: float = 1e-5
    seed: int = 0
    init: str = "auto"

    def __post_init__(self):
        if self.layout not in ("cp3", "cp4"):
            raise InputError(f"unknown CP layout {self.layout!r}", hint="use 'cp3' or 'cp4'")
        super().__post_init__()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.layout


@dataclass(frozen=True)
class StableCPConfig(CPConfig):
    """CP-ALS, then the sensitivity-minimising CPD-EPC at the CP-ALS error (Phan et al., "Stable
    low-rank tensor decomposition for compression of convolutional neural network", ECCV 2020).
    ``finish``: ``"channel"`` (least-squares scale per output channel), ``"refit"``
    (least-squares output factor) or ``"none"`` (the minimal-sensitivity point itself)."""

    max_sweeps: int = 30
    sweep_tol: float = 1e-3
    direct_max: int = 1024
    finish: str = "channel"

    def __post_init__(self):
        if self.finish not in ("channel", "refit", "none"):
            raise InputError(f"unknown stable CP finish {self.finish!r}", hint="use 'channel', 'refit' or 'none'")
        super().__post_init__()

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.layout}-stable"


@dataclass(frozen=True)
class LRSConfig(MethodConfig):
    """Low rank + sparse at a storage budget (values + int32 indices).

    Attributes:
        sparsity: fraction of each layer's bytes given to the sparse part; ``None``: the split
            with the lowest Sigma error (on held-out inputs when the pipeline has them).
        init: ``"data"``, ``"residual"``, ``"masked"`` or ``"auto"`` (``None``: the solver's).
        lowrank: the low-rank part's format: ``"svd"``, ``"tucker2"`` (``k x k`` convs) or
            ``"tt"`` (a TT-matrix, balanced modes of ``tt_cores`` cores: Linear layers and
            ungrouped 1x1 convs; Hawkins et al., "Low-rank+sparse tensor compression for neural
            networks", arXiv:2111.01697, 2021, sections 2.1-2.2).  Layers the format does not
            represent get the svd low-rank part (reported in the layer's ``lowrank``).
        tt_cores: TT-matrix cores of ``lowrank="tt"``.
        iters: alternating rounds of the final fit; split_iter: rounds per candidate split.
        fractions: the low-rank shares tried when choosing the split on held-out inputs.
        mode / candidates / switch_tol: passed to :func:`ddtd.solvers.lrs.lowrank_sparse`.
    """

    sparsity: float | None = None
    init: str | None = None
    lowrank: str = "svd"
    tt_cores: int = 3
    iters: int = 10
    split_iter: int = 3
    fractions: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    mode: str | None = None
    candidates: tuple | None = None
    switch_tol: float | None = None

    name: ClassVar[str] = "lrs"

    def __post_init__(self):
        if self.sparsity is not None and not 0.0 <= float(self.sparsity) <= 1.0:
            raise InputError(f"sparsity {self.sparsity} outside [0, 1]",
                             hint="the fraction of each layer's bytes given to the sparse part, e.g. 0.5")
        if self.init not in (None, "data", "residual", "masked", "auto"):
            raise InputError(f"unknown lrs init {self.init!r}", hint="use data, residual, masked or auto")
        if self.lowrank not in ("svd", "tucker2", "tt"):
            raise InputError(f"unknown low-rank part {self.lowrank!r}", hint="use 'svd', 'tucker2' or 'tt'")
        if isinstance(self.tt_cores, bool) or not isinstance(self.tt_cores, int) or self.tt_cores < 2:
            raise InputError(f"lrs: tt_cores must be an int >= 2, got {self.tt_cores!r}", hint="e.g. 3")
        super().__post_init__()

    def solver_options(self) -> dict:
        """The keywords of :func:`ddtd.solvers.lrs.lowrank_sparse` this config sets."""
        return {k: getattr(self, k) for k in ("mode", "init", "candidates", "switch_tol") if getattr(self, k) is not None}

    def for_layer(self, layer: nn.Module) -> "LRSConfig":
        """This config for ``layer``: a ``tt`` low-rank part becomes ``svd`` where the layer
        takes no TT-matrix (a padded 1x1 conv: the weight alone does not show the padding)."""
        if self.lowrank == "tt" and not format_applies("tt", layer)[0]:
            return replace(self, lowrank="svd")
        return self

    def lowrank_for(self, weight: torch.Tensor, groups: int | None) -> tuple[str, dict]:
        """The low-rank format this config gives a layer of ``weight`` (``lowrank``, or svd where
        it does not apply: tucker2 needs a ``k x k`` kernel with several input channels per
        group, tt a Linear weight or an ungrouped 1x1 kernel) and its solver keywords."""
        g = groups or 1
        k_by_k = weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1
        if self.lowrank == "tucker2" and k_by_k and weight.shape[1] > 1:
            return "tucker2", {}
        if self.lowrank == "tt" and not k_by_k and g == 1:
            T, D = weight.shape[0], int(math.prod(weight.shape[1:]))
            return "tt", {"tt_modes": tt_matrix_modes(T, D, self.tt_cores)}
        return "svd", {}


@dataclass(frozen=True)
class TTConfig(MethodConfig):
    """Tensor train in the Sigma norm (TT-ALS-Sigma, :mod:`ddtd.solvers.tt`): a ``k x k`` conv
    becomes the TT convolution (1x1 ``S -> R1``, ``k x 1``, ``1 x k``, 1x1 ``R3 -> T``), a Linear
    layer or 1x1 conv a TT-matrix (:class:`ddtd.layers.TTMatrix`).

    Attributes:
        cores: number of TT-matrix cores (modes: balanced factors of ``T`` and ``D``).
        out_modes / in_modes: explicit TT-matrix modes (only for layers whose sizes they
            factor; others use the balanced ones).  The planned size is kept: the ranks are
            re-sized to the same parameter budget for the chosen modes.
        max_iter, tol: ALS iterations and the relative-decrease stop; cg_max_iter: CG steps per
            core update.
    """

    cores: int = 3
    out_modes: tuple | None = None
    in_modes: tuple | None = None
    max_iter: int = 20
    tol: float = 1e-5
    cg_max_iter: int = 10

    name: ClassVar[str] = "tt"

    def __post_init__(self):
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 2:
            raise InputError(f"tt: cores must be an int >= 2, got {self.cores!r}", hint="e.g. 3")
        for k in ("out_modes", "in_modes"):
            v = getattr(self, k)
            if v is not None:
                if not isinstance(v, (tuple, list)) or len(v) < 2 or any(
                        isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in v):
                    raise InputError(f"tt: {k} must be ints >= 1 (at least two), got {v!r}", hint="e.g. (8, 8, 8)")
                object.__setattr__(self, k, tuple(v))
        if (self.out_modes is None) != (self.in_modes is None) or (
                self.out_modes is not None and len(self.out_modes) != len(self.in_modes)):
            raise InputError("tt: give out_modes and in_modes together, with as many of each",
                             hint="e.g. out_modes=(8, 8, 8), in_modes=(4, 8, 8)")
        if isinstance(self.cg_max_iter, bool) or not isinstance(self.cg_max_iter, int) or self.cg_max_iter < 1:
            raise InputError(f"tt: cg_max_iter must be an int >= 1, got {self.cg_max_iter!r}")
        super().__post_init__()

    def modes_for(self, T: int, D: int):
        """The TT-matrix ``(out_modes, in_modes)`` this config gives a ``T x D`` layer."""
        if self.out_modes is not None and math.prod(self.out_modes) == T and math.prod(self.in_modes) == D:
            return self.out_modes, self.in_modes
        return tt_matrix_modes(T, D, self.cores)


@dataclass(frozen=True)
class SparseConfig(MethodConfig):
    """Pruning only, at a storage budget: magnitude pruning in the Frobenius norm; in the Sigma
    norm the largest ``|W_ij| sqrt(Sigma_jj)`` kept and their values re-solved."""

    name: ClassVar[str] = "sparse"


@dataclass(frozen=True)
class AutoConfig:
    """Per layer, the candidate with the lowest (output-weighted) Sigma error at the allocated
    size. ``probe_iters``: the iterative candidates (tucker2, cp, lrs) are compared after this
    many iterations and only the winner is fitted in full (``None``: every candidate in full).
    ``stabilize``: a CP winner is refitted as stable CP (same error bound, lower sensitivity).
    ``lrs`` joins the candidates when the budget counts bytes only (``Size(budget="params")``): it
    saves bytes, not multiply-adds. Unless the budget counts bytes only, a candidate with more
    multiply-adds than the dense layer is not fitted (a TT-matrix of a Linear / 1x1 layer usually
    has more).

    ``tt`` (:class:`TTConfig`) is an opt-in candidate, compared through the same probes:
    ``AutoConfig(candidates=(SvdConfig(), Tucker2Config(), CPConfig("cp3"), CPConfig("cp4"),
    TTConfig()))``.  It is not a default one: on trained-like conv layers (power-law spectra,
    activation covariances; 64x32 and 64x64 3x3 kernels at 2x / 4x / 8x,
    benchmarks/auto_candidates.py) its Sigma error at equal parameters was never the lowest
    (cp3 won all six, tt was above svd in all six), so it would change no choice there and cost
    its probe (about 0.1 s per layer); a layer whose weight has tensor-train structure gets it
    when it is asked for."""

    candidates: tuple = field(default_factory=lambda: (SvdConfig(), Tucker2Config(), CPConfig("cp3"),
                                                       CPConfig("cp4")))
    stabilize: bool = True
    lrs: LRSConfig = field(default_factory=LRSConfig)
    probe_iters: int | None = 5

    name: ClassVar[str] = "auto"

    def __post_init__(self):
        if self.probe_iters is not None and (isinstance(self.probe_iters, bool) or not isinstance(self.probe_iters, int)
                                             or self.probe_iters < 1):
            raise InputError(f"probe_iters must be an int >= 1 or None, got {self.probe_iters!r}", hint="e.g. 5")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        bad = [c for c in self.candidates if not isinstance(c, MethodConfig) or get_method(c.name).sizing != "ranks"]
        if not self.candidates or bad:
            raise InputError(f"auto candidates must be rank-sized method configs, got {bad or 'none'}",
                             hint="e.g. (SvdConfig(), Tucker2Config(), CPConfig('cp3'))")


def with_settings(config, **settings):
    """``config`` with the given fields set wherever it has them (an :class:`AutoConfig`'s
    candidates and lrs config too); fields a config lacks are left alone. The CLI's
    ``--max-iter`` / ``--tol`` / ``--solver-seed`` reach every iterative method this way."""
    if isinstance(config, AutoConfig):
        return replace(config, candidates=tuple(with_settings(c, **settings) for c in config.candidates),
                       lrs=with_settings(config.lrs, **settings))
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in settings.items() if k in names})


def stable_version(config: CPConfig) -> StableCPConfig:
    """The stable CP config with the same CP-ALS settings as ``config``."""
    return StableCPConfig(**{f.name: getattr(config, f.name) for f in fields(CPConfig)})


def method_configs(config) -> dict[str, MethodConfig]:
    """Configs by method name for what ``config`` may fit: the method itself, or for
    :class:`AutoConfig` its candidates, their stable CP versions and lrs; svd always (the
    conv-only formats leave Linear and 1x1 layers to it, with the same bias correction)."""
    if not isinstance(config, AutoConfig):
        return {config.name: config, "svd": SvdConfig(bias_correction=config.bias_correction)} \
            if config.name != "svd" else {"svd": config}
    out = {c.name: c for c in config.candidates}
    for c in config.candidates:
        if isinstance(c, CPConfig) and not isinstance(c, StableCPConfig):
            out.setdefault(stable_version(c).name, stable_version(c))
    out.setdefault("lrs", config.lrs)
    return out


def default_config(name: str):
    """The default config of the registered method ``name`` (or ``"auto"``)."""
    if name == "auto":
        return AutoConfig()
    return get_method(name).config()


@dataclass(frozen=True)
class Fit:
    """What a method's solver returns for one layer.

    ``factors``: the builder's arguments (``kind``'s factor list; ``lrs`` / ``sparse``: one
    :class:`ddtd.solvers.lrs.LRSResult`); ``rel_error``: the solver's relative squared error of
    what it fitted; ``history``: its error history; ``info``: method extras for the report
    (every method: ``damping``, ``norm_ratio = ||W~||_F / ||W||_F`` and ``identity_error =
    ||W - W~||_F / ||W||_F`` of the solver's result, see :func:`ddtd.solvers.fit_diagnostics`
    and :func:`ddtd.solvers.norm_growth_warning`; ``sensitivity_before`` /
    ``sensitivity_after`` for CP, ``rank`` / ``nnz`` / ``bytes`` for low-rank + sparse).
    """

    factors: list
    rel_error: float
    history: list
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: its config, how it solves, what it builds and how it is sized.

    ``config``: makes the method's default config. ``solve``: ``(weight, sigma | None, ranks,
    config, *, name, groups, holdout) -> Fit`` (``holdout``: ``(Sigma_fit, Sigma_held)`` or
    ``None``, used by methods that choose a split on held-out inputs). ``kind``: the layer format
    it builds (a builder of :mod:`ddtd.layers`: ``svd``, ``tucker2``, ``cp3``, ``cp4``, or
    ``lrs`` for :class:`ddtd.layers.LowRankSparse`). ``sizing``: ``"ranks"`` (the plan gives
    ranks of ``kind``) or ``"budget"`` (a storage budget in 4-byte units: the parameters an svd
    of the allocated rank would have). ``conv_only``: needs a ``k x k`` conv with several input
    channels per group; ``grouped``: handles grouped / depthwise convs.
    """

    name: str
    config: Callable[[], MethodConfig]
    solve: Callable
    conv_only: bool
    description: str
    kind: str = ""
    sizing: str = "ranks"
    grouped: bool = True

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", self.name)


def applicable(method: str, layer: nn.Module) -> tuple[bool, str]:
    """Can ``method`` represent ``layer``? Returns (ok, reason if not): its format must apply
    (:func:`ddtd.layers.format_applies`), a conv-only format is not used on a 1x1 conv (where it
    is an SVD with extra layers), and grouped convs need a method that handles groups."""
    T, S, kh, kw, g = layer_dims(layer)
    m = get_method(method)
    if m.conv_only or m.kind in FORMATS:
        ok, why = format_applies(m.kind, layer)
        if not ok:
            return False, why
    if m.conv_only:
        if kh * kw == 1:
            return False, f"{method} on a 1x1 conv is an SVD with extra layers; use svd"
    if not m.grouped and g > 1:
        return False, f"{method} does not handle grouped convs"
    return True, ""


#: the keys of a solver result's ``info`` that every :class:`Fit` carries
DIAGNOSTICS = ("damping", "norm_ratio", "identity_error")


def _diagnostics(res) -> dict:
    info = getattr(res, "info", None) or {}
    return {k: info[k] for k in DIAGNOSTICS if k in info}


def _damping(cfg: MethodConfig, sigma) -> float:
    return cfg.damping_for() if sigma is not None else 0.0


def _svd(weight, sigma, ranks, cfg: SvdConfig, *, name=None, groups=None, holdout=None):
    r = sigma_svd(weight, sigma, int(ranks), damping=_damping(cfg, sigma), name=name)
    return Fit([r.A, r.B], r.rel_error, [r.rel_error], _diagnostics(r))


def _tucker2(weight, sigma, ranks, cfg: Tucker2Config, *, name=None, groups=None, holdout=None):
    ranks = (ranks, ranks) if isinstance(ranks, int) else tuple(ranks)
    r = tucker2(weight, sigma, ranks, max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed, init=cfg.init,
                damping=_damping(cfg, sigma), name=name)
    return Fit([r.U, r.core, r.V], r.rel_error, list(r.history), _diagnostics(r))


def _cp_factors(r, layout):
    return [r.A, r.B, r.C] if layout == "cp3" else [r.A, r.B, r.C, r.E]


def _cp_als(weight, sigma, ranks, cfg: CPConfig, name):
    return cp_als(weight, sigma, int(ranks), layout=cfg.layout, max_iter=cfg.max_iter, tol=cfg.tol,
                  seed=cfg.seed, init=cfg.init, damping=_damping(cfg, sigma), name=name)


def _cp(weight, sigma, ranks, cfg: CPConfig, *, name=None, groups=None, holdout=None):
    from .solvers.stable_cp import balance, sensitivity

    r = _cp_als(weight, sigma, ranks, cfg, name)
    factors = _cp_factors(r, cfg.layout)
    ss = sensitivity(*balance(*factors))
    return Fit(factors, r.rel_error, list(r.history),
               {"sensitivity_before": ss, "sensitivity_after": ss, **_diagnostics(r)})


def _stable_cp(weight, sigma, ranks, cfg: StableCPConfig, *, name=None, groups=None, holdout=None):
    """CP-ALS, then the sensitivity-minimising CPD-EPC at the CP-ALS error."""
    from .solvers.stable_cp import stable_cp

    init = _cp_als(weight, sigma, ranks, cfg, name)
    r = stable_cp(weight, sigma, int(ranks), layout=cfg.layout, init=init, damping=_damping(cfg, sigma),
                  max_sweeps=cfg.max_sweeps, tol=cfg.sweep_tol, direct_max=cfg.direct_max, finish=cfg.finish,
                  name=name)
    return Fit(_cp_factors(r, cfg.layout), r.rel_error, list(r.history),
               {"sensitivity_before": float(r.sensitivity_before),
                "sensitivity_after": float(r.sensitivity_after),
                "cp_als_error": float(init.rel_error), **_diagnostics(r)})


def _lrs_sigma(sigma, damping: float = 0.0):
    """A single group's ``(1, D, D)`` covariance squeezed to ``(D, D)``, damped by
    ``damping * mean(diag) * I`` per group (:func:`ddtd.solvers.damp`)."""
    if sigma is None:
        return None
    sigma = damp(sigma, damping)
    return sigma[0] if sigma.dim() == 3 and sigma.shape[0] == 1 else sigma


def _lrs_info(res) -> dict:
    return {"rank": list(res.rank), "nnz": int(res.nnz), "bytes": int(res.nbytes()),
            "lowrank": res.lowrank, **_diagnostics(res)}


def relative_sigma_error(weight, approx, sigma) -> float:
    """Relative ``sum_g trace(E_g Sigma_g E_g^T) / sum_g trace(W_g Sigma_g W_g^T)``, ``E = W - W~``;
    ``sigma`` ``(D, D)`` or ``(g, D_g, D_g)``, the weights grouped along their first dim."""
    g = 1 if sigma.dim() == 2 else sigma.shape[0]
    s3 = sigma if sigma.dim() == 3 else sigma[None]
    W = weight.to(torch.float64).reshape(g, weight.shape[0] // g, -1)
    E = W - approx.to(torch.float64).reshape(W.shape)
    num = float(sum(torch.trace(E[i] @ s3[i] @ E[i].T) for i in range(g)))
    den = float(sum(torch.trace(W[i] @ s3[i] @ W[i].T) for i in range(g)))
    # both are quadratic forms in a PSD matrix: a negative value is rounding of a (near) zero one
    return max(num, 0.0) / den if den > 0 else 0.0


def _lrs_heldout_split(weight, sigma, budget, cfg: LRSConfig, name, groups, holdout, kw):
    """The (rank, nonzeros) split with the lowest Sigma error on held-out inputs: each of
    ``cfg.fractions`` fitted briefly on ``holdout[0]`` and measured in ``holdout[1]`` (the
    in-sample error of a sparse part solved exactly in Sigma is optimistic where samples are few
    per input dimension)."""
    from .solvers import lrs as L

    sig_fit = _lrs_sigma(holdout[0])  # the solver damps it (kw["damping"])
    sig_held = _lrs_sigma(holdout[1], cfg.damping_for())
    lowrank, extra = cfg.lowrank_for(weight, groups)
    best = None
    for f in cfg.fractions:
        try:
            rank, nnz, res, _ = L.split_budget(weight, sig_fit, budget, lowrank=lowrank, name=name,
                                               fractions=(f,), max_iter=cfg.split_iter, groups=groups,
                                               **kw, **extra)
        except InputError:
            continue
        e = relative_sigma_error(weight, res.kernel().reshape(weight.shape), sig_held)
        if best is None or e < best[0]:
            best = (e, rank, nnz)
    return best[1], best[2]


def _lrs(weight, sigma, budget, cfg: LRSConfig, *, name=None, groups=None, holdout=None):
    """Low-rank + sparse at a storage budget (4-byte units): the split between rank and
    nonzeros is ``cfg.sparsity`` (the fraction of the budget spent on the sparse part's values
    and indices) or, by default, the split with the lowest Sigma error
    (:func:`ddtd.solvers.lrs.split_budget`, on held-out inputs when given), refitted with
    ``cfg.iters`` rounds."""
    from .solvers import lrs as L

    groups = groups if groups and groups > 1 else None
    lowrank, extra = cfg.lowrank_for(weight, groups)
    kw = {**cfg.solver_options(), "damping": _damping(cfg, sigma)}
    sig = _lrs_sigma(sigma)
    budget = int(budget)
    T, D = weight.shape[0], int(math.prod(weight.shape[1:]))
    data_init = {**kw, **extra, "init": kw.get("init") or "data"}
    if cfg.sparsity is None and holdout is not None:
        rank, nnz = _lrs_heldout_split(weight, sigma, budget, cfg, name, groups, holdout, kw)
        res = L.lowrank_sparse(weight, sig, rank, nnz, lowrank=lowrank, max_iter=cfg.iters, name=name,
                               groups=groups, **data_init)
    elif cfg.sparsity is None:
        rank, nnz, res, _ = L.split_budget(weight, sig, budget, lowrank=lowrank, name=name,
                                           max_iter=cfg.split_iter, groups=groups, **kw, **extra)
        if cfg.iters > cfg.split_iter:  # refit the chosen split longer (from the data start unless told)
            refit = L.lowrank_sparse(weight, sig, rank, nnz, lowrank=lowrank, max_iter=cfg.iters, name=name,
                                     groups=groups, **data_init)
            res = refit if refit.rel_error <= res.rel_error else res
    else:
        nnz = min(int(float(cfg.sparsity) * budget) // (1 + L.INDEX_UNITS), T * D)
        rank = L.rank_for_units(tuple(weight.shape), lowrank, budget - nnz * (1 + L.INDEX_UNITS), groups or 1,
                                tt_modes=extra.get("tt_modes"))
        res = L.lowrank_sparse(weight, sig, rank, nnz, lowrank=lowrank, max_iter=cfg.iters, name=name,
                               groups=groups, **kw, **extra)
    return Fit([res], res.rel_error, list(res.history), _lrs_info(res))


def _tt(weight, sigma, ranks, cfg: TTConfig, *, name=None, groups=None, holdout=None):
    """TT convolution of a ``k x k`` kernel, TT-matrix of a Linear / 1x1 weight, at ``ranks``
    (the planned ranks for the balanced modes of :data:`ddtd.solvers.formats.DEFAULT_TT_CORES`
    cores; other modes get the ranks of the same parameter budget)."""
    opts = dict(max_iter=cfg.max_iter, tol=cfg.tol, cg_max_iter=cfg.cg_max_iter, damping=_damping(cfg, sigma),
                name=name)
    T = weight.shape[0]
    if weight.dim() == 4 and weight.shape[2] * weight.shape[3] > 1:
        r = tt_conv(weight, sigma, ranks, groups=groups, **opts)
        return Fit([r.C, r.Y, r.X, r.T], r.rel_error, list(r.history), _diagnostics(r))
    D = int(math.prod(weight.shape[1:]))
    modes = cfg.modes_for(T, D)
    if modes != tt_matrix_modes(T, D, len(ranks) + 1 if isinstance(ranks, (tuple, list)) else cfg.cores):
        ranks = tt_rank_for_budget(T, D, 1, 1, tt_params(T, D, 1, 1, ranks), modes=modes)
    r = tt_matrix(weight, sigma, ranks, out_modes=modes[0], in_modes=modes[1], **opts)
    return Fit(list(r.cores), r.rel_error, list(r.history), _diagnostics(r))


def _sparse(weight, sigma, budget, cfg: SparseConfig, *, name=None, groups=None, holdout=None):
    """Pruning only, at a storage budget: the Frobenius norm keeps the largest weights
    (magnitude pruning), the Sigma norm keeps the largest ``|W_ij| sqrt(Sigma_jj)`` and re-solves
    the kept values in the Sigma metric."""
    from .solvers import lrs as L

    T, D = weight.shape[0], int(math.prod(weight.shape[1:]))
    nnz = min(int(budget) // (1 + L.INDEX_UNITS), T * D)
    fn = L.sigma_prune if sigma is not None else L.magnitude_prune
    res = fn(weight, _lrs_sigma(sigma), nnz, name=name, groups=groups if groups and groups > 1 else None,
             damping=_damping(cfg, sigma))
    return Fit([res], res.rel_error, list(res.history), _lrs_info(res))


METHODS: dict[str, Method] = {
    "svd": Method("svd", SvdConfig, _svd, False,
                  "W ~ A B (conv with the original kernel to r channels, then 1x1)"),
    "tucker2": Method("tucker2", Tucker2Config, _tucker2, True, "1x1 to R2, k x k R2 -> R1, 1x1 to T"),
    "cp3": Method("cp3", lambda: CPConfig("cp3"), _cp, True, "1x1 to R, depthwise k x k, 1x1 to T"),
    "cp4": Method("cp4", lambda: CPConfig("cp4"), _cp, True,
                  "1x1 to R, depthwise k x 1, depthwise 1 x k, 1x1 to T"),
    "cp3-stable": Method("cp3-stable", lambda: StableCPConfig("cp3"), _stable_cp, True,
                         "cp3 of minimal sensitivity at the CP-ALS error (robust to rounding)", kind="cp3"),
    "cp4-stable": Method("cp4-stable", lambda: StableCPConfig("cp4"), _stable_cp, True,
                         "cp4 of minimal sensitivity at the CP-ALS error (robust to rounding)", kind="cp4"),
    "tt": Method("tt", TTConfig, _tt, False,
                 "tensor train: 1x1, k x 1, 1 x k, 1x1 for convs; TT-matrix for Linear / 1x1 layers"),
    "lrs": Method("lrs", LRSConfig, _lrs, False, "low rank + sparse (values + int32 indices), same bytes as svd",
                  kind="lrs", sizing="budget"),
    "sparse": Method("sparse", SparseConfig, _sparse, False,
                     "pruning only (values + int32 indices), same bytes as svd", kind="lrs", sizing="budget"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}", hint=f"use one of {sorted(METHODS)} or auto")
    return METHODS[name]
