"""Fit one layer: a method's factors from its weight and the data it sees, and the bias.

:func:`solve` is pure tensor maths around a registered method's solver (:mod:`ddtd.methods`):

* the objective is ``trace((W' - W~) Sigma_c (W' - W~)^T)`` with the centred covariance
  ``Sigma_c`` of the inputs the replacement will see and ``W'`` the weight to fit (``W`` itself,
  or the sequential regression target of :mod:`ddtd.sequential`);
* the bias becomes ``b~ = b + W mu_in - W~ mu``, so that with the bias correction the centred
  objective is the exact mean squared output error on the calibration data;
* with output-channel weights ``D`` (:mod:`ddtd.sensitivity`) the objective is
  ``trace(D (W - W~) Sigma (W - W~)^T)``, solved by fitting ``D^{1/2} W`` and dividing the
  output factor's rows by ``D^{1/2}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .layers import factorized_weight
from .methods import MethodConfig, get_method, relative_sigma_error

__all__ = ["LayerData", "LayerFit", "solve", "dense_weight"]

#: Formats whose first factor maps to the output channels (output weights apply to them).
ROW_FACTOR_KINDS = ("svd", "tucker2", "cp3", "cp4")


@dataclass(frozen=True)
class LayerData:
    """What one layer is fitted against.

    Attributes:
        sigma: ``(g, D, D)`` centred covariance of the inputs the replacement will see.
        mean: ``(g, D)`` their mean.
        target: weight to fit instead of ``W`` (sequential fitting: ``W'``), ``W``'s shape.
        mean_in: ``(g, D)`` mean of the original inputs (sequential fitting), for the bias.
        out_weights: ``(T,)`` output-channel weights ``D`` (fitted with by the formats whose
            first factor maps to the outputs: svd, tucker2, cp; the others are fitted without
            them); every fit's ``weighted_error`` is measured with them.
        holdout: ``(Sigma_fit, Sigma_held)`` covariances of two disjoint parts of the inputs,
            for choices an in-sample error would bias (the low-rank / sparse split).
    """

    sigma: torch.Tensor
    mean: torch.Tensor
    target: torch.Tensor | None = None
    mean_in: torch.Tensor | None = None
    out_weights: torch.Tensor | None = None
    holdout: tuple | None = None

    def to(self, device) -> "LayerData":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerData(move(self.sigma), move(self.mean), move(self.target), move(self.mean_in),
                         move(self.out_weights),
                         None if self.holdout is None else tuple(move(t) for t in self.holdout))


@dataclass
class LayerFit:
    """A fitted layer: the builder's ``factors`` and the corrected ``bias``; ``sigma_error``
    (relative, centred, of the fitted target), ``solver_error`` (the solver's own), ``weight_error``
    (``||W - W~||_F / ||W||_F``), the error ``history`` and ``info`` (method extras, plus
    ``weighted_error`` with output weights)."""

    method: str
    factors: list
    bias: torch.Tensor | None
    sigma_error: float | None
    solver_error: float
    weight_error: float
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def dense_weight(layer: nn.Module, method: str, factors: list, name: str | None = None) -> torch.Tensor:
    """The dense weight ``W~`` a method's factors represent, shaped like ``layer.weight``."""
    m = get_method(method)
    if m.kind == "lrs":
        return factors[0].kernel().reshape(layer.weight.shape)
    return factorized_weight(layer, m.kind, *factors, name=name)


def _by_group(t: torch.Tensor, g: int) -> torch.Tensor:
    return t.reshape(g, t.shape[0] // g, -1)


def _divide_rows(first, scale_g: torch.Tensor):
    """The output factor (rows = output channels; ``(T, r)``, ``(g, T_g, r)`` or a list of
    per-group ``(T_g, r)``) with row ``t`` of group ``i`` divided by ``scale_g[i, t]``."""
    if isinstance(first, torch.Tensor):
        rows = scale_g.unsqueeze(-1) if first.dim() == 3 else scale_g.reshape(-1, 1)
        return (first.to(torch.float64) / rows.to(first.device)).to(first.dtype)
    return [(f.to(torch.float64) / scale_g[i].unsqueeze(-1).to(f.device)).to(f.dtype) for i, f in enumerate(first)]


def _corrected_bias(layer: nn.Module, W_new: torch.Tensor, data: LayerData, correct: bool):
    """``b + W mu_in - W~ mu`` per group (``mu_in = mu`` for the original inputs), or the
    original bias when ``correct`` is off."""
    W = layer.weight.detach()
    if not correct:
        return layer.bias.detach().clone() if layer.bias is not None else None
    g = data.sigma.shape[0]
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros(
        W.shape[0], dtype=torch.float64, device=W.device)
    mu_in = data.mean if data.mean_in is None else data.mean_in
    Wg, Wng = _by_group(W.to(torch.float64), g), _by_group(W_new, g)
    shift = torch.cat([Wg[i] @ mu_in[i].to(torch.float64) - Wng[i] @ data.mean[i].to(torch.float64)
                       for i in range(g)])
    return (b + shift).to(W.dtype)


def solve(layer: nn.Module, config: MethodConfig, ranks, data: LayerData, *, norm: str = "sigma",
          name: str | None = None) -> LayerFit:
    """Fit one layer with the method of ``config`` at ``ranks`` (a budget-sized method: its
    storage budget) against ``data``; ``norm="frobenius"`` fits the weights alone (the reported
    ``sigma_error`` is still measured in ``data.sigma``). Pure tensor maths: the layer is not
    changed."""
    m = get_method(config.name)
    config = config.for_layer(layer)
    W = layer.weight.detach()
    Wt = W if data.target is None else data.target
    g = data.sigma.shape[0]
    sigma64 = data.sigma.to(torch.float64)
    metric = sigma64 if norm == "sigma" else None
    holdout = data.holdout if norm == "sigma" and data.target is None else None
    scale = None
    if data.out_weights is not None and m.kind in ROW_FACTOR_KINDS:
        scale = data.out_weights.to(Wt.device, torch.float64).sqrt()
        view = (-1,) + (1,) * (Wt.dim() - 1)
        fit = m.solve((Wt.to(torch.float64) * scale.view(view)).to(Wt.dtype), metric, ranks, config,
                      name=name, groups=g, holdout=holdout)
        fit = replace(fit, factors=[_divide_rows(fit.factors[0], scale.reshape(g, -1)), *fit.factors[1:]])
    else:
        fit = m.solve(Wt, metric, ranks, config, name=name, groups=g, holdout=holdout)
    W_new = dense_weight(layer, config.name, fit.factors, name=name).to(torch.float64)
    correct = config.bias_correction if config.bias_correction is not None else norm == "sigma"
    weight_error = float((W.to(torch.float64) - W_new.reshape(W.shape)).norm()
                         / W.to(torch.float64).norm().clamp_min(1e-30))
    info = dict(fit.info)
    if data.out_weights is not None:  # every candidate of auto is scored in the same metric
        scale = data.out_weights.to(Wt.device, torch.float64).sqrt()
        view = (-1,) + (1,) * (W.dim() - 1)
        info["weighted_error"] = relative_sigma_error(Wt.to(torch.float64) * scale.view(view),
                                                      W_new.reshape(W.shape) * scale.view(view), sigma64)
    return LayerFit(config.name, fit.factors, _corrected_bias(layer, W_new, data, correct),
                    relative_sigma_error(Wt, W_new, sigma64), fit.rel_error, weight_error, fit.history, info)
