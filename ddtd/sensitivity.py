"""How much each layer's output error moves the model's output: label-free Fisher weights.

A replacement changes layer ``l``'s output ``y_l`` (``C_l`` channels at ``P_l`` positions per
input) by ``delta``. To second order, the change of the model's loss is
``0.5 * sum_p delta_p^T H_p delta_p`` with ``H_p`` the Gauss-Newton / Fisher matrix of the
layer output at position ``p``. ddtd keeps its diagonal, with the same weight at every position
(``Sigma`` is the same at every position too): with ``g = d loss / d y_l`` for one input,

    d_l[c] = E_x sum_p g[c, p]^2                 (one weight per output channel),

so the loss change is ``0.5 * trace(D_l (W - W~) Sigma (W - W~)^T)``, ``D_l = diag(d_l)``: the
Sigma-norm objective with the output channels weighted. It is minimised over a format by fitting
``D^{1/2} W`` in the Sigma norm and scaling the result's output rows by ``D^{-1/2}``, and its
value, the discarded eigenvalues of ``D^{1/2} W Sigma W^T D^{1/2}``, puts every layer's error in
the same unit (the model's loss) for a global rank allocation
(:func:`ddtd.ranks.whitened_spectrum` with ``out_weights``). Channels the output never feels
(ReLU6 saturated, dead) get small weights, so an efficient network's fragile layers are kept.

The loss needs no labels:

* classifiers (an output of shape ``(N, K)``): the log-likelihood of a class drawn from the
  model's own prediction, ``-log p(y | x)`` with ``y ~ p(. | x)``; then ``E||g||^2`` is the
  trace of the Fisher information, the curvature of the KL divergence to the original
  predictions (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
  PNAS 2017; the same weight is used for low-rank compression by Hsu et al., "Language model
  compression with weighted low-rank factorization", ICLR 2022);
* any other output: ``v . f(x)`` with ``v ~ N(0, I)``, whose squared gradient has expectation
  ``trace(J^T J)``, the Gauss-Newton curvature of the squared output error.

The model's parameters are not changed, and no parameter gradient is computed.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .inputs import Feed, batch_size, to_device
from .inputs import map_tensors

__all__ = ["output_sensitivity", "OUTPUT_WEIGHT_FLOOR"]

#: Each channel weight is at least this share of its layer's mean weight (a channel that never
#: reaches the output keeps a finite weight, so ``D^{-1/2}`` stays bounded).
OUTPUT_WEIGHT_FLOOR = 1e-3


class _GradientNorms:
    """Owns the hooks that sum ``||d loss / d y_l||^2`` over the batches (a context manager)."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.modules = {n: m for n, m in model.named_modules() if n in set(names)}
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _forward_hook(self, name):
        def hook(m, _inputs, out):
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return
            cdim = 1 if isinstance(m, nn.Conv2d) else out.dim() - 1  # Linear: features last
            def grad_hook(grad):
                g2 = grad.detach().double().pow(2).movedim(cdim, -1).reshape(-1, grad.shape[cdim]).sum(0).cpu()
                self.sums[name] = self.sums[name] + g2 if name in self.sums else g2

            out.register_hook(grad_hook)

        return hook


def output_sensitivity(model: nn.Module, batches: Iterable, names: Iterable[str], *, feed: Feed | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-channel output weights ``d_l`` of each named layer (see the module docstring).

    Args:
        model: the (BN-folded) model in eval mode; its parameters are left as they are.
        batches: input batches (:mod:`ddtd.inputs`: tensors, tuples or dicts).
        names: qualified names of the layers to weigh.
        feed: how batches reach the model (:class:`ddtd.inputs.Feed`: device, ``forward``,
            token ``mask``; default: the model's device, called as the batch says). With a token
            mask, padding positions of a ``(B, L, ...)`` output do not enter the loss.
        seed: seed of the sampled classes / projections.

    Returns:
        name -> ``(C_l,)`` float64 CPU tensor ``d_l``, floored at :data:`OUTPUT_WEIGHT_FLOOR` times
        its mean. A layer the backward pass never reaches is left out (its output does not
        matter to the model's output).
    """
    feed = feed or Feed(next((p.device for p in model.parameters()), torch.device("cpu")))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    n = 0
    try:
        for p in params:
            p.requires_grad_(False)
        with _GradientNorms(model, names) as hooks, torch.enable_grad():
            for b in batches:
                b = _float_inputs_require_grad(to_device(b, feed.device), params)
                out, mask = Feed(feed.device, feed.forward, feed.mask).run(model, b)
                _loss(out, mask, gen).backward()
                n += batch_size(b)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    out = {}
    for name, s in hooks.sums.items():
        d = s / n
        if bool(torch.isfinite(d).all()) and float(d.mean()) > 0:
            out[name] = d.clamp_min(OUTPUT_WEIGHT_FLOOR * float(d.mean()))
    return out


def _float_inputs_require_grad(batch, params):
    """The batch with its float tensors requiring grad, so the backward pass reaches every layer;
    when it has none (token ids), the parameters require grad instead (their grads are dropped)."""
    floats = [False]

    def mark(t):
        if t.is_floating_point():
            floats[0] = True
            return t.detach().requires_grad_(True)
        return t

    batch = map_tensors(batch, mark)
    if not floats[0]:
        for p in params:
            p.requires_grad_(True)
    return batch


def _loss(out: torch.Tensor, mask, gen) -> torch.Tensor:
    """Sampled-label NLL for ``(N, K)`` class scores (the Fisher of the model's own predictions),
    else a random projection of the output (Gauss-Newton), padding positions masked out."""
    dev = out.device
    if out.dim() == 2 and out.shape[1] > 1:
        logp = torch.log_softmax(out.double(), dim=1)
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(dev)
        return -logp.gather(1, y).sum()
    v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dev)
    if mask is not None and out.dim() >= 2 and tuple(out.shape[:2]) == tuple(mask.shape):
        v = v * mask.to(dev).reshape(*mask.shape, *([1] * (out.dim() - 2)))
    return (out.double() * v).sum()
