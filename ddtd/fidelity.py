"""Held-out fidelity of a compressed model, and the search for the largest ratio that keeps it.

Fidelity is measured against the original model on inputs not used to fit, with no labels:

* top-1 agreement, the share of inputs where both models pick the same class (outputs of shape
  ``(N, K)``; for other outputs agreement is not defined and only the error is used);
* relative output error ``||f~(X) - f(X)||_F / ||f(X)||_F`` over all held-out outputs.

The ratio search probes whole-model compression ratios with a cheap stand-in for the final fit:
every selected layer replaced by its Sigma-SVD truncation at the rank the allocation gives it,
applied as a dense weight ``W~ = S^{-1} U_r U_r^T S W`` per group, where ``S = D^{1/2}`` holds
the square roots of the output-channel weights (:mod:`ddtd.sensitivity`; ``I`` without them) and
``U`` the eigenvectors of ``S W Sigma W^T S`` (the optimal rank-``r`` fit of
``trace(D (W - W~) Sigma (W - W~)^T)``, Eckart-Young on ``S W Sigma^{1/2}``), with the bias
moved to ``b + (W - W~) mu``. One eigen-decomposition per layer serves every
probe, so a probe costs one forward pass over the held-out inputs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .inputs import Feed, batch_size, count
from .layers import get_module

__all__ = ["Fidelity", "HeldOut", "SvdProbe", "search_ratio"]


@dataclass
class Fidelity:
    """Held-out fidelity: top-1 agreement (``None`` when the output is not ``(N, K)``) and
    the relative output error, on ``images`` inputs."""

    agreement: float | None
    relative_error: float
    images: int

    def meets(self, min_agreement: float | None, max_error: float | None) -> bool:
        ok = True
        if min_agreement is not None:
            ok &= self.agreement is not None and self.agreement >= min_agreement
        if max_error is not None:
            ok &= self.relative_error <= max_error
        return bool(ok)

    def to_dict(self) -> dict:
        return asdict(self)


class HeldOut:
    """Held-out inputs and the reference model's outputs on them (computed once). Batches of any
    kind (:mod:`ddtd.inputs`); with a token mask, padding positions of ``(B, L, ...)`` outputs
    are left out of the error."""

    def __init__(self, reference: nn.Module, batches: list, feed):
        self.batches = batches
        self.feed = feed if isinstance(feed, Feed) else Feed(feed)  # a Feed, or a device
        self.outputs = [self._run(reference, b) for b in batches]

    @torch.no_grad()
    def _run(self, model: nn.Module, batch) -> torch.Tensor:
        out, mask = self.feed.run(model, batch)
        out = out.detach()
        if mask is not None and out.dim() >= 3 and tuple(out.shape[:2]) == tuple(mask.shape):
            out = out[mask.to(out.device)]
        return out

    @property
    def images(self) -> int:
        return count(self.batches)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> Fidelity:
        agree = 0
        err2 = ref2 = 0.0
        classes = True
        for b, ref in zip(self.batches, self.outputs):
            out = self._run(model, b)
            err2 += float((out.double() - ref.double()).pow(2).sum())
            ref2 += float(ref.double().pow(2).sum())
            if out.dim() == 2 and out.shape[1] > 1 and len(out) == batch_size(b):
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
            else:
                classes = False
        n = self.images
        return Fidelity(agree / n if classes and n else None, math.sqrt(err2 / ref2) if ref2 > 0 else 0.0, n)


class SvdProbe:
    """Dense Sigma-SVD truncations of the selected layers at any rank (see the module docstring).

    Args:
        model: the BN-folded model (not modified).
        moments: name -> :class:`ddtd.calibration.LayerMoments` (or a store).
        names: layers to probe (Conv2d / Linear).
        sigma_norm: ``False`` gives the weight-only (Frobenius) truncation, ``Sigma = I``.
        correct_bias: move the bias to ``b + (W - W~) mu`` (``False``: keep ``b``, as a weight-only
            tool does).
    """

    def __init__(self, model: nn.Module, moments, names, *, sigma_norm: bool = True, correct_bias: bool = True,
                 out_weights: dict[str, torch.Tensor] | None = None):
        self.correct_bias = correct_bias
        from .solvers import eigh

        self.model = model
        self.layers = {}
        for name in names:
            layer = get_module(model, name)
            lm = moments[name]
            g = lm.groups
            W = layer.weight.detach().to(torch.float64).cpu()
            Wg = W.reshape(g, W.shape[0] // g, -1)
            d = (out_weights or {}).get(name)
            s = (d.to(torch.float64).sqrt() if d is not None else torch.ones(W.shape[0], dtype=torch.float64)
                 ).reshape(g, -1, 1)
            Ws = s * Wg
            if sigma_norm:
                G = Ws @ lm.covariance().to(torch.float64) @ Ws.transpose(1, 2)
            else:
                G = Ws @ Ws.transpose(1, 2)
            ev, U = eigh(G)
            # W~ = S^{-1} U_r U_r^T S W: the best rank-r fit in the output-weighted Sigma norm
            self.layers[name] = (Wg, ev.flip(-1).clamp_min(0), U.flip(-1) / s, s * U.flip(-1),
                                 lm.mean().to(torch.float64))

    def spectra(self) -> dict[str, torch.Tensor]:
        """name -> ``(g, min(T_g, D))`` squared singular values of ``W Sigma^{1/2}``, descending."""
        return {n: ev[:, : min(Wg.shape[1], Wg.shape[2])] for n, (Wg, ev, *_) in self.layers.items()}

    def truncated(self, name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W~, bias shift)`` of layer ``name`` at per-group rank ``rank``: ``W~`` in the layer's
        weight shape, the shift ``(W - W~) mu`` of length ``T``."""
        Wg, _, left, right, mu = self.layers[name]
        Wt = left[:, :, :rank] @ (right[:, :, :rank].transpose(1, 2) @ Wg)
        shift = torch.einsum("gtd,gd->gt", Wg - Wt, mu).reshape(-1)
        return Wt.reshape(get_module(self.model, name).weight.shape), shift

    @torch.no_grad()
    def model_at(self, ranks: dict[str, int | None]) -> nn.Module:
        """A copy of the model with each layer in ``ranks`` (rank ``None``: dense) truncated."""
        m = copy.deepcopy(self.model)
        for name, r in ranks.items():
            if r is None or name not in self.layers:
                continue
            layer = get_module(m, name)
            Wt, shift = self.truncated(name, int(r))
            layer.weight.copy_(Wt.to(layer.weight))
            if not self.correct_bias:
                continue
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.out_channels if isinstance(layer, nn.Conv2d)
                                                      else layer.out_features,
                                                      dtype=layer.weight.dtype, device=layer.weight.device))
            layer.bias.add_(shift.to(layer.bias))
        return m


#: The ratio search: first probe, largest ratio probed, relative width at which bisection stops.
SEARCH_START, SEARCH_MAX_RATIO, SEARCH_REL_TOL = 2.0, 64.0, 0.02


def search_ratio(fidelity_at: Callable[[float], Fidelity | None], *, min_agreement: float | None = None,
                 max_error: float | None = None, probes: int = 9,
                 rel_tol: float = SEARCH_REL_TOL) -> tuple[float | None, list[dict]]:
    """Largest ratio whose probe fidelity meets the target.

    ``fidelity_at(ratio)`` returns the probe's :class:`Fidelity`, or ``None`` when the ratio
    is out of reach. Fidelity falls with the ratio (not strictly: the search brackets the first
    failure by doubling from :data:`SEARCH_START` up to :data:`SEARCH_MAX_RATIO`, then bisects
    the bracket in log scale), using at most
    ``probes`` probes and stopping when the bracket is within ``rel_tol``.

    Returns:
        (the largest passing ratio, or ``None`` if even the smallest probe fails; the curve as
        a list of ``{"ratio", "agreement", "relative_error", "meets"}`` in probe order).
    """
    curve: list[dict] = []

    def probe(r: float) -> bool | None:
        f = fidelity_at(r)
        if f is None:
            curve.append({"ratio": r, "agreement": None, "relative_error": None, "meets": False,
                          "note": "out of reach"})
            return None
        ok = f.meets(min_agreement, max_error)
        curve.append({"ratio": r, "agreement": f.agreement, "relative_error": f.relative_error, "meets": ok})
        return ok

    lo, hi = 1.0, None  # lo passes (ratio 1 is the model itself), hi fails
    r, max_ratio = SEARCH_START, SEARCH_MAX_RATIO
    while len(curve) < probes:
        ok = probe(r)
        if ok:
            lo = r
            if r >= max_ratio:
                break
            r = min(max_ratio, r * 2)
        else:
            hi = r
            break
    if hi is None and lo == 1.0:
        return None, curve
    while hi is not None and len(curve) < probes and hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return (lo if lo > 1.0 else None), curve

