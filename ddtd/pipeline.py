"""Compress a model end to end: fold BN, calibrate, plan ranks, fit each layer, assemble.

:func:`compress` is a short orchestration of typed pieces that can be used alone:

* :func:`prepare` - copy the model and fold BatchNorm into the convs before it (the error that
  matters is the one after BN);
* :func:`ddtd.calibration.calibrate` - input moments per layer (or a store from disk);
* :func:`ddtd.planning.plan` - which layers, which method, which ranks;
* :func:`ddtd.fitting.solve` - one layer: factors from its weight and (centred) covariance,
  with the bias moved to ``b + (W - W~) mu``;
* :func:`ddtd.sequential.decide` - per layer, whether to fit on the compressed model's inputs;
* :func:`assemble` - swap the fitted chains in, by qualified name.

Objective per layer (``norm="sigma"``): ``min trace((W - W~) Sigma_c (W - W~)^T)`` with the
centred covariance ``Sigma_c``; the bias correction makes that the exact mean squared output
error on the calibration data.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .calibration import CovarianceStore, calibrate
from .calibration.run import default_batch_size, image_transform, input_batches, warn_zero_variance
from .checks import check_finite_weights, check_has_layers, resolve_device, unsupported_layers
from .config import CalibrationConfig, CompressConfig, Size, config_from_options
from .errors import InputError
from .fidelity import Fidelity, HeldOut, SvdProbe, search_ratio
from .fitting import LayerData, LayerFit, solve
from .inputs import Feed, count, example_of, first_samples, is_shape, map_tensors, probe_input, rebatch, split_batches, \
    to_device
from .layers import (describe_split, fold_batchnorm, fold_records, get_module, macs_by_layer, merge_compressed,
                     replace_layer, split_attention)
from .methods import AutoConfig, CPConfig, SvdConfig, get_method, method_configs, stable_version, with_settings
from .planning import LayerPlan, Plan, is_depthwise, kept_attention, layer_macs, plan, prunes_depthwise, ranks_for_format, \
    svd_ranks_at_size
from .report import CompressResult, LayerReport, Report
from .selection import compressible_layers, layer_filter
from .sensitivity import output_sensitivity
from . import distributed
from . import sequential as seq
from .solvers import norm_growth_warning

__all__ = ["prepare", "assemble", "compress", "stored_units", "POOR_AGREEMENT", "SAFE_AGREEMENT"]

log = logging.getLogger("ddtd")

#: Calibration inputs used to estimate the output sensitivities (one backward pass each).
SENSITIVITY_IMAGES = 128
#: Below this held-out agreement a ``ratio`` result is flagged loudly, with the ratio that keeps
#: :data:`SAFE_AGREEMENT`.
POOR_AGREEMENT = 0.90
SAFE_AGREEMENT = 0.99
#: With a fidelity target: fits tried, and the shrink of ``ratio - 1`` after a miss.
TARGET_ATTEMPTS = 3
TARGET_BACKOFF = 0.8


def prepare(model: nn.Module) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` in eval mode with BatchNorm folded into the preceding convs and every
    ``nn.MultiheadAttention`` rewritten with ``nn.Linear`` projections
    (:func:`ddtd.layers.split_attention`; the outputs are unchanged).

    A model ddtd compressed before (its ``ddtd_records``) has its factor chains merged back into
    dense layers (:func:`ddtd.layers.merge_compressed`), so a further compression re-fits them at
    lower ranks and the number of layers does not grow.

    Returns the copy and the records of all this (for the saved file, after those the model
    already had). The original is not touched.
    """
    work = copy.deepcopy(model).eval()
    records = list(getattr(model, "ddtd_records", None) or [])
    work, folded = fold_batchnorm(work, inplace=True)
    split, _ = split_attention(work)
    records += fold_records(folded) + [describe_split(n) for n in split]
    return work, records + merge_compressed(work, records)


def assemble(model: nn.Module, fits: dict[str, LayerFit]) -> list[dict]:
    """Swap fitted layers into ``model`` (in place) by qualified name.

    Each layer becomes a plain ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.Linear`` (low-rank +
    sparse: a :class:`ddtd.layers.LowRankSparse`). Returns the replacement records that
    :func:`ddtd.model_io.load_model` replays on a fresh architecture.
    """
    return [replace_layer(model, name, get_method(f.method).kind, f.factors, f.bias) for name, f in fits.items()]


def stored_units(module: nn.Module, *, exclude_bias: bool = False) -> int:
    """Stored numbers of ``module``: its parameters plus the int32 index buffers of sparse
    parts (one 4-byte unit each), so low-rank + sparse layers are counted honestly against
    dense and factorized ones."""
    n = sum(q.numel() for k, q in module.named_parameters() if not (exclude_bias and k.endswith("bias")))
    n += sum(b.numel() for k, b in module.named_buffers() if k == "index" or k.endswith(".index"))
    return n


def _macs_after(work: nn.Module, input_shape, report: Report) -> int:
    """Multiply-adds of the compressed model, measured by hooks; a low-rank + sparse layer runs
    one conv / linear with its merged weight (no hooked sub-module), so it counts as its
    original layer."""
    measured = macs_by_layer(work, probe_input(input_shape))
    sparse_rows = [r for r in report.layers if r.method != "dense" and get_method(r.method).kind == "lrs"]
    names = [r.name for r in sparse_rows]
    total = sum(v for k, v in measured.items() if not any(k == n or k.startswith(n + ".") for n in names))
    return total + sum(r.macs_after for r in sparse_rows)


@dataclass
class _Inputs:
    """Calibration inputs in memory (batches of any kind, :mod:`ddtd.inputs`): those fitted on
    (``batches``), the held-out share for fidelity (``heldout``), the batch size, one input's
    shape or an example batch of one input (``input_shape``) and how batches reach the model."""

    batches: list | None
    heldout: list | None
    batch_size: int
    input_shape: object
    feed: Feed


def _read_inputs(model: nn.Module, data, cal: CalibrationConfig, device) -> _Inputs:
    """Read ``data`` into memory (the sequential and fidelity steps see it again), on the CPU;
    with 16 inputs or more, a seeded share ``cal.holdout`` (at least 4) is held out for fidelity."""
    transform = image_transform(model, data, cal.transform)
    batch_size = cal.batch_size or (default_batch_size(data, transform) if data is not None else 64)
    batches = heldout = None
    if data is not None:
        it, _, _ = input_batches(data, transform, cal, batch_size, model=model, shard=False)
        batches = [to_device(b, "cpu") for b in it]
        if not batches:
            raise InputError("no calibration inputs", hint="pass a non-empty image folder, DataLoader or tensor")
        if cal.holdout and count(batches) >= 16:
            kept, held = split_batches(batches, cal.holdout, cal.seed + 7919)
            batches, heldout = rebatch(kept, batch_size), rebatch(held, batch_size)
    shape = cal.input_shape or (example_of(batches[0]) if batches else None)
    if shape is None:
        raise InputError("input_shape is needed when compressing from a store alone",
                         hint="pass CalibrationConfig(input_shape=(C, H, W)) or --size")
    if isinstance(shape, torch.Tensor) and shape.is_floating_point():
        shape = tuple(shape.shape[1:])  # a float tensor input: probed with zeros of its shape, as a store is
    return _Inputs(batches, heldout, batch_size, shape, Feed(device, cal.forward, cal.mask))


def _check_request(model: nn.Module, data, config: CompressConfig, store) -> None:
    """Refuse an impossible request before any work (calibration can take minutes)."""
    resolve_device(config.device)
    check_has_layers(model)
    check_finite_weights(model)
    if data is None and store is None:
        raise InputError("nothing to calibrate on", hint="pass data (images / DataLoader / tensor) or a store")
    if config.size.target and data is None:
        raise InputError("a fidelity target needs held-out calibration inputs",
                         hint="pass data (images / DataLoader / tensor) with at least 16 inputs")
    if config.size.target and not config.calibration.holdout:
        raise InputError("a fidelity target is measured on held-out inputs, and holdout is 0",
                         hint="keep CalibrationConfig(holdout=0.125) (--holdout) above 0")


def _moments(model: nn.Module, work: nn.Module, inputs: _Inputs, config: CompressConfig, store, filter_fn):
    """Per-layer moments of the layers to compress: from the store, or calibrated on the inputs
    (on the CPU, like a store's: each layer's Sigma moves to the device only while it is fitted)."""
    if store is not None:
        st = store if isinstance(store, CovarianceStore) else CovarianceStore(store)
        st.check_model(model)
        return st
    modules, kept = dict(work.named_modules()), kept_attention(work)
    needed = [n for n in compressible_layers(work) if filter_fn(n, modules[n]) and n not in kept
              and not (is_depthwise(modules[n]) and not prunes_depthwise(config))]
    if not needed:
        raise InputError("no layer to compress: the filter leaves out every Conv2d / Linear layer",
                         hint="check --layers / filter_fn (the input layer and classifier need --include-first / --include-last)")
    c = config.calibration
    cal = CalibrationConfig(batch_size=inputs.batch_size, show_progress=c.show_progress, forward=c.forward, mask=c.mask)
    moments = calibrate(work, inputs.batches, cal, layers=needed, check_variance=False).moments
    return {n: lm.to_cpu() for n, lm in moments.items()}


def _fmt_fid(f: dict) -> str:
    agree = f.get("agreement")
    err = f.get("relative_error")
    if err is None:
        return "out of reach"
    return (f"agreement {100 * agree:.1f}%, " if agree is not None else "") + f"relative output error {err:.3f}"


@dataclass
class _Job:
    """What every stage of one compression shares."""

    work: nn.Module            # the BN-folded copy (never modified; each fit works on a copy)
    moments: object
    config: CompressConfig
    filter_fn: Callable
    inputs: _Inputs
    device: torch.device
    records: list
    flat: set                  # layers whose inputs have no variance
    weights: dict | None = None
    on_layer: Callable | None = None

    def at_ratio(self, ratio: float, method=None) -> CompressConfig:
        s = self.config.size
        size = Size(ratio=ratio, budget=s.budget, strategy=s.strategy, allocation=s.allocation, scope=s.scope)
        return replace(self.config, size=size, method=method or self.config.method)

    def plan(self, config: CompressConfig, spectra=None) -> Plan:
        return plan(self.work, self.moments, config, input_shape=self.inputs.input_shape, filter_fn=self.filter_fn,
                    weights=self.weights, spectra=spectra)


def _sensitivities(job: _Job) -> dict | None:
    """Per-channel output weights of the layers to compress, when the allocation asks for them."""
    size = job.config.size
    if not (size.allocation == "sensitivity" and job.config.norm == "sigma" and size.strategy == "global"
            and (size.ratio is not None or size.target)):
        return None
    if job.inputs.batches is None:
        log.info("allocation: relative layer errors (output sensitivities need calibration inputs, not only a store)")
        return None
    names = [n for n in compressible_layers(job.work) if n in job.moments]
    sample = rebatch(first_samples(job.inputs.batches, SENSITIVITY_IMAGES), job.inputs.batch_size)
    return output_sensitivity(job.work, sample, names, feed=job.inputs.feed, seed=job.config.calibration.seed)


class _RatioSearch:
    """The largest whole-model ratio whose Sigma-SVD probes meet a fidelity target on the
    held-out inputs (:func:`ddtd.fidelity.search_ratio`)."""

    def __init__(self, job: _Job, held: HeldOut):
        self.job, self.held, self.probe = job, held, None

    def _probe(self) -> SvdProbe:
        if self.probe is None:
            base = self.job.plan(self.job.at_ratio(1.001, SvdConfig()))
            names = [p.name for p in base.layers if p.method is not None or (
                p.name in self.job.moments and "would not shrink" in p.reason)]
            bias = self.job.config.method
            bias = bias.bias_correction if not isinstance(bias, AutoConfig) else None
            self.probe = SvdProbe(self.job.work, self.job.moments, names, sigma_norm=self.job.config.norm == "sigma",
                                  out_weights=self.job.weights,
                                  correct_bias=bias if bias is not None else self.job.config.norm == "sigma")
        return self.probe

    def __call__(self, min_agreement, max_error):
        probe = self._probe()

        def fidelity_at(r):
            try:
                p = self.job.plan(self.job.at_ratio(r, SvdConfig()), spectra=probe.spectra())
            except InputError:
                return None
            return self.held.measure(probe.model_at({q.name: q.ranks for q in p.active}))

        return search_ratio(fidelity_at, min_agreement=min_agreement, max_error=max_error)


def compress(model: nn.Module, data=None, config: CompressConfig | None = None, *, store=None,
             filter_fn: Callable[[str, nn.Module], bool] | None = None,
             on_layer: Callable[[LayerReport], None] | None = None, **options) -> CompressResult:
    """Compress ``model`` with no fine-tuning; the original is not modified.

    Args:
        model: any ``nn.Module`` whose ``nn.Conv2d`` / ``nn.Linear`` layers are to be compressed.
        data: calibration inputs: an image folder, a DataLoader or a tensor batch. Optional when
            ``store`` is given (then sequential fitting and fidelity are not available).
        config: :class:`ddtd.config.CompressConfig` (default: 2x by parameters, ``auto``, Sigma).
        store: a covariance store (path or :class:`ddtd.calibration.CovarianceStore`) made for
            this model.
        filter_fn: ``(name, module) -> bool``, the layers to compress (default: every Conv2d /
            Linear but the input layer and the final classifier, :func:`ddtd.layer_filter`).
        on_layer: called with each layer's :class:`ddtd.report.LayerReport` as it is fitted.
        options: deprecated flat keywords (``ratio=4, method="svd", layers=..., ...``), turned
            into ``config`` by :func:`ddtd.config.config_from_options` and ``filter_fn`` by
            :func:`ddtd.selection.layer_filter`, with a ``DeprecationWarning``.

    With a ratio, the held-out fidelity (top-1 agreement with the original and the relative
    output error on ``calibration.holdout`` of the inputs, not fitted on) is measured and a
    POOR FIDELITY warning logged below :data:`POOR_AGREEMENT`, with the ratio the probes find to
    keep :data:`SAFE_AGREEMENT`. With a fidelity target (``Size(min_agreement=...)``), the
    largest ratio whose Sigma-SVD probes meet it is fitted with the configured method and
    checked on the same inputs (up to :data:`TARGET_ATTEMPTS` fits, each at a smaller ratio).

    In an initialised ``torch.distributed`` group, call it on every rank with the same arguments:
    every rank reads the inputs (they are kept for the held-out fidelity and sequential fitting),
    the moment accumulation is split by batch and its sums all-reduced, and without sequential
    fitting the layer solves are spread over the ranks by estimated cost (:func:`solve_cost`) and
    gathered, so every rank returns the same result. Sequential fitting (the default ``"auto"``
    with data) fits layer after layer on every rank alike: only its calibration is split. An
    error on one rank raises :class:`ddtd.distributed.RankFailure` on every rank.

    Returns:
        :class:`ddtd.report.CompressResult`: the compressed ``nn.Module`` (plain PyTorch), the
        :class:`ddtd.report.Report` (per-layer table, totals, ``fidelity``, ``seconds``) and
        the replacement records.
    """
    with distributed.shared_failures():
        return _compress(model, data, config, store, filter_fn, on_layer, options)


def _compress(model: nn.Module, data, config, store, filter_fn, on_layer, options: dict) -> CompressResult:
    t0 = time.time()
    if options:
        config, filter_fn = _from_flat_options(model, config, filter_fn, options)
    config = config or CompressConfig()
    _check_request(model, data, config, store)
    if config.stages > 1:
        return _compress_in_stages(model, data, config, filter_fn, on_layer)
    work, records = prepare(model)
    if config.device is not None:
        work = work.to(config.device)  # the copy: the caller's model stays on its device
    dev = next((p.device for p in work.parameters()), torch.device("cpu"))
    filter_fn = filter_fn or layer_filter(work)
    inputs = _read_inputs(model, data, config.calibration, dev)
    seconds = {"calibrate": time.time()}
    moments = _moments(model, work, inputs, config, store, filter_fn)
    seconds["calibrate"] = time.time() - seconds["calibrate"]
    modules = dict(work.named_modules())
    flat = set(warn_zero_variance({n: moments[n] for n in compressible_layers(work)
                                   if n in moments and filter_fn(n, modules[n])}))
    job = _Job(work, moments, config, filter_fn, inputs, dev, records, flat, on_layer=on_layer)
    t = time.time()
    job.weights = _sensitivities(job)
    seconds["sensitivity"] = time.time() - t
    result = _fit_to_request(job, seconds)
    result.report.settings.update(allocation="sensitivity" if job.weights is not None else "relative",
                                  min_agreement=config.size.min_agreement,
                                  max_output_error=config.size.max_output_error, holdout=config.calibration.holdout)
    result.report.seconds = {**seconds, "total": time.time() - t0}
    result.model.ddtd_spec = getattr(model, "ddtd_spec", None)
    result.model.ddtd_records = list(result.records)
    return result


def _compress_in_stages(model: nn.Module, data, config: CompressConfig, filter_fn, on_layer) -> CompressResult:
    """``config.stages`` compressions at ratios ``ratio ** (k / stages)``, each recalibrated on the
    model the previous one produced. Every stage merges the chains back into dense layers of the
    original geometry first (:func:`prepare`), so each stage's ratio is measured from the
    original model and the last one lands on ``ratio``."""
    if data is None:
        raise InputError("compressing in stages recalibrates between stages and needs the data, not a store",
                         hint="pass data (images / batches)")
    current, seconds, steps = model, {}, []
    for k in range(1, config.stages + 1):
        step = config.size.ratio ** (k / config.stages)
        result = compress(current, data, replace(config, stages=1, size=replace(config.size, ratio=step)),
                          filter_fn=filter_fn, on_layer=on_layer)
        steps.append({"ratio": step, "reached": result.report.ratio, **result.report.fidelity.get("heldout", {})})
        for key, v in result.report.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + v
        log.info("stage %d of %d: %.3fx", k, config.stages, result.report.ratio)
        current = result.model
    result.report.settings.update(stages=steps, ratio=config.size.ratio)
    result.report.seconds = seconds
    return result


def _from_flat_options(model: nn.Module, config, filter_fn, options: dict):
    """The config and filter of the flat keywords ``compress`` took before :class:`CompressConfig`."""
    import warnings

    if config is not None:
        raise InputError(f"give either config or flat options ({', '.join(sorted(options))}), not both",
                         hint="put every setting in the CompressConfig")
    layers = {k: options.pop(k) for k in ("layers", "include_first", "include_last") if k in options}
    warnings.warn("compress(model, data, ratio=..., ...) is deprecated: pass "
                  "config=ddtd.config_from_options(...) or a CompressConfig" +
                  (", and filter_fn=ddtd.layer_filter(model, ...)" if layers else ""), DeprecationWarning, stacklevel=3)
    if layers:
        if filter_fn is not None:
            raise InputError("give either filter_fn or layers / include_first / include_last, not both")
        filter_fn = layer_filter(model, layers.get("layers"), include_first=bool(layers.get("include_first")),
                                 include_last=bool(layers.get("include_last")))
    return config_from_options(**options), filter_fn


def _fit_to_request(job: _Job, seconds: dict) -> CompressResult:
    """Fit at the requested size, or search a fidelity target's ratio and fit it (stepping down
    on a miss); measure and report the held-out fidelity."""
    size = job.config.size
    held = HeldOut(job.work, job.inputs.heldout, job.inputs.feed) if job.inputs.heldout else None
    search = _RatioSearch(job, held) if held is not None else None
    fidelity: dict = {"holdout_images": held.images if held else 0, "from_store": not isinstance(job.moments, dict)}
    config = job.config
    if size.target:
        t = time.time()
        chosen, curve = search(size.min_agreement, size.max_output_error)
        seconds["search"] = time.time() - t
        fidelity.update(target={"min_agreement": size.min_agreement, "max_output_error": size.max_output_error},
                        curve=curve)
        if chosen is None:
            raise InputError(
                f"no compression meets the target on the {held.images} held-out inputs (probe curve: "
                + ", ".join(f"{c['ratio']:.2f}x: {_fmt_fid(c)}" for c in curve) + ")",
                hint="relax --min-agreement / --max-drop / --max-output-error, or calibrate on more images")
        log.info("fidelity target: the probes keep it up to %.3fx; fitting at that ratio", chosen)
        config = job.at_ratio(chosen)
    t = time.time()
    for _ in range(TARGET_ATTEMPTS if size.target else 1):
        result = _fit_model(job, config)
        if held is None:
            break
        reached = held.measure(result.model)
        fidelity["heldout"] = reached.to_dict()
        fidelity.setdefault("attempts", []).append({"ratio": result.report.ratio, **reached.to_dict()})
        if not size.target or reached.meets(size.min_agreement, size.max_output_error):
            break
        log.warning("the fitted model at %.3fx misses the target on held-out inputs (%s); trying a smaller ratio",
                    config.size.ratio, _fmt_fid(reached.to_dict()))
        config = job.at_ratio(1 + (config.size.ratio - 1) * TARGET_BACKOFF)
    seconds["solve"] = time.time() - t
    if held is not None:
        _judge_fidelity(job, search, fidelity, result.report, seconds)
    result.report.fidelity = fidelity
    return result


def _judge_fidelity(job: _Job, search: _RatioSearch, fidelity: dict, report: Report, seconds: dict) -> None:
    """Log the held-out fidelity reached; a poor one, with the ratio that keeps SAFE_AGREEMENT."""
    size, f = job.config.size, fidelity["heldout"]
    if size.target and not Fidelity(f["agreement"], f["relative_error"], f["images"]).meets(
            size.min_agreement, size.max_output_error):
        log.warning("the target was not met on the held-out inputs: %s at %.3fx", _fmt_fid(f), report.ratio)
    elif not size.target and f["agreement"] is not None and f["agreement"] < POOR_AGREEMENT:
        t = time.time()
        safe, curve = search(SAFE_AGREEMENT, None)
        seconds["search"] = time.time() - t
        fidelity.update(safe_ratio_estimate=safe, curve=curve)
        log.warning("*** POOR FIDELITY: the compressed model agrees with the original on only %.1f%% of %d "
                    "held-out inputs (relative output error %.3f). %s ***", 100 * f["agreement"], f["images"],
                    f["relative_error"],
                    f"A ratio of about {safe:.2f}x keeps {100 * SAFE_AGREEMENT:.0f}% agreement (svd probe; "
                    f"--min-agreement {SAFE_AGREEMENT} finds it)" if safe else
                    f"No probed ratio keeps {100 * SAFE_AGREEMENT:.0f}% agreement")
    else:
        log.info("held-out fidelity: %s", _fmt_fid(f))


def _holdout_moments(work: nn.Module, inputs: _Inputs, names: list[str]) -> dict:
    """Per layer of ``names`` ``(Sigma_fit, Sigma_held)``: centred covariances of three quarters
    of the calibration inputs and of the held-out quarter (for the low-rank / sparse split)."""
    fit_b, held_b = seq.split_holdout(inputs.batches, inputs.batch_size)
    if held_b is None or not names:
        return {}
    cal = CalibrationConfig(batch_size=inputs.batch_size, show_progress=False, forward=inputs.feed.forward,
                            mask=inputs.feed.mask)
    a = calibrate(work, fit_b, cal, layers=names, check_variance=False).moments
    b = calibrate(work, held_b, cal, layers=names, check_variance=False).moments
    return {n: (a[n].covariance(), b[n].covariance()) for n in a if n in b}


def _fit_model(job: _Job, config: CompressConfig) -> CompressResult:
    """Plan and fit every layer of a copy of the BN-folded model."""
    work = copy.deepcopy(job.work)
    records = list(job.records)
    plan_ = job.plan(config)
    mode = seq.mode_for(config.sequential, job.inputs.batches is not None, config.norm)
    parts = (job.inputs.batches, None)
    if mode == "auto":
        first = rebatch(first_samples(job.inputs.batches, seq.SEQUENTIAL_IMAGES), job.inputs.batch_size)
        parts = seq.split_holdout(first, job.inputs.batch_size)
    reference = copy.deepcopy(job.work) if mode != "off" else None
    params_before = sum(q.numel() for q in work.parameters())  # BN folded, nothing replaced yet
    s = config.size
    report = Report(settings=dict(method=config.method.name, norm=config.norm, ratio=s.ratio, budget=s.budget,
                                  rank=s.rank, error=s.error, strategy=s.strategy, scope=s.scope, sequential=mode,
                                  input_shape=list(job.inputs.input_shape) if is_shape(job.inputs.input_shape)
                                  else "example batch"))
    for name, reason in unsupported_layers(work).items():
        n = get_module(work, name).weight.numel()
        report.layers.append(LayerReport(name, type(get_module(work, name)).__name__, "dense", None, n, n,
                                         0, 0, None, None, 0.0, reason))
    configs = method_configs(config.method)
    split_names = [p.name for p in plan_.active if "lrs" in p.candidates] \
        if getattr(configs.get("lrs"), "sparsity", 0) is None else []
    holdout = _holdout_moments(work, job.inputs, split_names) if (
        config.norm == "sigma" and job.inputs.batches is not None) else {}
    shared = _fit_shared(job, config, configs, plan_, work, parts, holdout) \
        if distributed.world_size() > 1 and mode == "off" else None
    for p in plan_.layers:
        row, fit = shared[p.name] if shared is not None else \
            _fit_layer(job, config, configs, p, plan_, work, reference, parts, mode, holdout.get(p.name))
        if fit is not None:
            records += assemble(work, {p.name: fit})
            row.params_after = stored_units(get_module(work, p.name), exclude_bias=True)
            _log_layer(row, fit)
        report.layers.append(row)
        if job.on_layer is not None:
            job.on_layer(row)
    report.params_before = params_before
    report.params_after = stored_units(work)
    report.macs_before = sum(plan_.macs.values())
    report.macs_after = _macs_after(work, job.inputs.input_shape, report)
    fitted = [r for r in report.layers if r.name in plan_.shapes]
    report.settings["layers_ratio"] = (sum(r.params_before for r in fitted) / max(1, sum(r.params_after for r in fitted))
                                       if fitted else None)
    work.ddtd_spec = getattr(work, "ddtd_spec", None)
    return CompressResult(work, report, records)


def solve_cost(layer: nn.Module, p: LayerPlan) -> float:
    """Estimated cost of fitting one layer: per group ``D^3 + T D^2`` (``D`` inputs and ``T``
    outputs per group: an eigendecomposition of Sigma and the products of the weight with it), once
    per candidate format."""
    groups = getattr(layer, "groups", 1)
    d, t = layer.weight[0].numel(), layer.weight.shape[0] // groups
    return float(max(1, len(p.candidates)) * groups * (d ** 3 + t * d ** 2))


def _fit_shared(job: _Job, config: CompressConfig, configs: dict, plan_: Plan, work, parts, holdout) -> dict:
    """Non-sequential fits of every planned layer on the ranks of the process group: layers given
    to ranks by estimated cost (:func:`solve_cost`, :func:`ddtd.distributed.assign_by_cost`), each
    rank fitting its own, the ``(report row, fit)`` of all gathered on every rank (factors through
    the CPU)."""
    owner = distributed.assign_by_cost({p.name: solve_cost(get_module(work, p.name), p) for p in plan_.layers})
    cpu = lambda t: t.cpu()  # noqa: E731
    mine = {}
    for p in plan_.layers:
        if owner[p.name] == distributed.rank():
            row, fit = _fit_layer(job, config, configs, p, plan_, work, None, parts, "off", holdout.get(p.name))
            mine[p.name] = (row, fit if fit is None else replace(fit, factors=map_tensors(fit.factors, cpu),
                                                                 bias=map_tensors(fit.bias, cpu)))
    here = lambda t: t.to(job.device)  # noqa: E731
    out = {}
    for part in distributed.agree(mine):
        for name, (row, fit) in part.items():
            out[name] = (row, fit if fit is None else replace(fit, factors=map_tensors(fit.factors, here),
                                                              bias=map_tensors(fit.bias, here)))
    return out


def _log_layer(row: LayerReport, fit: LayerFit) -> None:
    growth = norm_growth_warning(fit.info, row.name)
    if growth:
        log.warning(growth)
    log.info("%s: %s ranks %s, %d -> %d params, %s", row.name, row.method, row.ranks, row.params_before,
             row.params_after, "no Sigma error (inputs without variance)" if row.sigma_error is None
             else f"Sigma error {row.sigma_error:.4f}")


def _layer_data(job: _Job, p: LayerPlan, layer, shape, models, parts, mode, holdout):
    """What one layer is fitted against (original or sequential inputs), whether it is
    sequential, and the decision's record."""
    decision = seq.SequentialDecision(False)
    if mode == "auto":
        r = svd_ranks_at_size(p.method, p.ranks, shape)
        decision = seq.decide(p.name, layer, models, parts, r, job.inputs.feed)
    elif mode == "on":
        xs = seq.capture(models[0], p.name, job.inputs.batches, job.inputs.feed)
        xts = seq.capture(models[1], p.name, job.inputs.batches, job.inputs.feed)
        if not all(torch.equal(a, b) for a, b in zip(xs, xts)):  # else nothing changed upstream
            decision = seq.SequentialDecision(True, {}, seq.sequential_data(layer, xs, xts))
    ow = None if job.weights is None or job.config.norm != "sigma" else job.weights.get(p.name)
    if decision.sequential:
        return replace(decision.data, out_weights=ow), decision
    lm = job.moments[p.name]
    return LayerData(lm.covariance(), lm.mean(), out_weights=ow, holdout=holdout), decision


def _probe_config(cfg, auto: AutoConfig):
    """``cfg`` cut to ``auto.probe_iters`` iterations for the comparison of candidates (the
    closed-form svd and ``probe_iters=None`` leave it as it is)."""
    if auto.probe_iters is None or isinstance(cfg, SvdConfig):
        return cfg
    short = with_settings(cfg, max_iter=min(getattr(cfg, "max_iter", auto.probe_iters), auto.probe_iters),
                          iters=min(getattr(cfg, "iters", auto.probe_iters), auto.probe_iters))
    return short if short != cfg else cfg


def _fit_layer(job: _Job, config: CompressConfig, configs: dict, p: LayerPlan, plan_: Plan, work, reference,
               parts, mode, holdout) -> tuple[LayerReport, LayerFit | None]:
    """Fit one planned layer (every candidate for ``auto``, the best kept); its report row and
    fit (``None``: it stays dense)."""
    layer = get_module(work, p.name)
    before, mac_b = layer.weight.numel(), plan_.macs.get(p.name, 0)
    dense = lambda note, secs=0.0: LayerReport(p.name, type(layer).__name__, "dense", None, before, before,  # noqa: E731
                                               mac_b, mac_b, None, None, secs, note)
    if p.method is None:
        return dense(p.reason), None
    ts = time.time()
    data, decision = _layer_data(job, p, layer, plan_.shapes[p.name], (reference, work), parts, mode, holdout)
    data = data.to(job.device)
    norm = config.norm
    flat = p.name in job.flat and norm == "sigma" and not decision.sequential
    if flat:  # no variance: fit the weights; the bias correction keeps the (constant) outputs exact
        norm = "frobenius"
    auto = isinstance(config.method, AutoConfig)
    best, slower = None, []
    for m in (p.candidates if auto else [p.method]):
        r = p.ranks if not auto or m == p.method else ranks_for_format(m, plan_.shapes[p.name], p.ranks)
        if r is None:
            continue
        if config.size.budget != "params" and layer_macs(m, plan_.shapes[p.name], r) > mac_b:
            slower.append(m)  # more multiply-adds than the dense layer: never, unless bytes only
            continue
        cfg = replace(configs[m], bias_correction=True) if flat else configs[m]
        probe = _probe_config(cfg, config.method) if auto and len(p.candidates) > 1 else cfg
        fit = solve(layer, probe, r, data, norm=norm, name=p.name)
        score = fit.info.get("weighted_error", fit.sigma_error) if norm == "sigma" else fit.weight_error
        if best is None or score < best[0]:
            best = (score, r, fit, cfg, probe is not cfg)
    if best is None:
        return dense(f"{'/'.join(slower)} at this size would need more multiply-adds than the dense layer "
                     "(--budget params allows it)", time.time() - ts), None
    _, r, fit, cfg, probed = best
    if probed:  # the winner of the short fits, fitted in full
        fit = solve(layer, cfg, r, data, norm=norm, name=p.name)
    if auto and config.method.stabilize and isinstance(configs[fit.method], CPConfig):
        # same error bound, lower sensitivity: robust to rounding and to upstream errors
        cfg = stable_version(configs[fit.method])
        fit = solve(layer, replace(cfg, bias_correction=True) if flat else cfg, r, data, norm=norm, name=p.name)
    if flat:
        fit.sigma_error = None  # relative to an input energy of zero: not defined
    note = "sequential" if decision.sequential else ("inputs without variance: fitted to the weights" if flat else "")
    row = LayerReport(p.name, type(layer).__name__, fit.method, list(r) if isinstance(r, tuple) else r, before,
                      before, mac_b, layer_macs(fit.method, plan_.shapes[p.name], r), fit.sigma_error,
                      fit.weight_error, time.time() - ts, note, info={**fit.info, **decision.info})
    return row, fit
