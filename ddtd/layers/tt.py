"""Tensor-train replacement layers (the ``tt`` format of :mod:`ddtd.solvers.tt`).

* TT convolution of a ``kh x kw`` conv (per group ``k``: ``C (S_g, R1)``, ``Y (R1, kh, R2)``,
  ``X (R2, kw, R3)``, ``T (R3, T_g)``): ``Sequential(Conv2d(S, g R1, 1, groups=g) [C^T],
  Conv2d(g R1, g R2, (kh, 1), stride (sh, 1), padding (ph, 0), dilation (dh, 1), groups=g) [Y],
  Conv2d(g R2, g R3, (1, kw), stride (1, sw), padding (0, pw), dilation (1, dw), groups=g) [X],
  Conv2d(g R3, T, 1, groups=g) [T^T, bias])``: plain ``nn.Conv2d`` layers, exact for every padding
  mode for the reasons given in :mod:`ddtd.layers.builders` (cp4 splits the geometry alike).
* :class:`TTMatrix` for a Linear layer or an ungrouped, unpadded 1x1 conv: the cores
  ``G_k (r_{k-1}, t_k, d_k, r_k)`` applied as ``nn.Linear`` layers (no bias) between reshapes and
  permutes (Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015), so that parameter and
  multiply-add counts (:func:`ddtd.layers.macs_by_layer`) see every product, the state dict holds
  plain tensors (``cores.k.weight``, ``bias``) and ``torch.jit.trace`` / ONNX export see standard
  ops only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddtd.errors import InputError, layer_label

__all__ = ["TTMatrix", "tt_conv_chain"]


class TTMatrix(nn.Module):
    """``y = W~ x + b`` with ``W~ (T x D)`` a TT-matrix (out modes ``t_k``, in modes ``d_k``).

    Core ``k`` is ``cores[k]``, an ``nn.Linear(d_k r_k -> r_{k-1} t_k, bias=False)`` whose weight
    is ``G_k.reshape(r_{k-1} t_k, d_k r_k)``.  Forward (cores from the last to the first): the
    input ``(N, d_1..d_d)`` is kept as ``(N d_1..d_{k-1}, d_k, r_k, t_{k+1}..t_d)``; step ``k``
    contracts ``(d_k, r_k)`` with core ``k`` and folds ``d_{k-1}`` out of the rows, so that after
    core 1 the state is ``(N, T)``.  Multiply-adds per input vector:
    :func:`ddtd.solvers.formats.tt_matrix_macs`.

    ``conv``: the layer replaces a 1x1 ``nn.Conv2d`` (input ``(N, S, H, W)``, ``stride``
    subsamples the positions); else a Linear layer (input ``(..., D)``).
    """

    def __init__(self, out_modes, in_modes, ranks, *, bias: bool = True, conv: bool = False,
                 stride=(1, 1), dtype=None, device=None):
        super().__init__()
        self.out_modes = tuple(int(t) for t in out_modes)
        self.in_modes = tuple(int(d) for d in in_modes)
        self.ranks = tuple(int(r) for r in ranks)
        if len(self.out_modes) != len(self.in_modes) or len(self.ranks) != len(self.out_modes) - 1:
            raise InputError(f"TT-matrix with modes {self.out_modes} x {self.in_modes} and ranks {self.ranks}",
                             hint="need as many out modes as in modes and one rank per bond")
        self.conv = bool(conv)
        self.stride = tuple(int(s) for s in stride)
        rs = (1,) + self.ranks + (1,)
        self.cores = nn.ModuleList(
            nn.Linear(d * rs[k + 1], rs[k] * t, bias=False, dtype=dtype, device=device)
            for k, (t, d) in enumerate(zip(self.out_modes, self.in_modes)))
        T = math.prod(self.out_modes)
        self.bias = nn.Parameter(torch.zeros(T, dtype=dtype, device=device)) if bias else None

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    def core(self, k: int) -> torch.Tensor:
        """``G_k (r_{k-1}, t_k, d_k, r_k)``."""
        rs = (1,) + self.ranks + (1,)
        return self.cores[k].weight.reshape(rs[k], self.out_modes[k], self.in_modes[k], rs[k + 1])

    def matrix(self) -> torch.Tensor:
        """``W~ (T, D)``."""
        from ddtd.solvers.tt import tt_full

        return tt_full([self.core(k) for k in range(len(self.cores))])

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D) -> (N, T)``."""
        d = len(self.in_modes)
        rs = (1,) + self.ranks + (1,)
        z = x.reshape(-1, self.in_modes[-1], 1, 1)                 # (N d_1..d_{d-1}, d_d, r_d, P=1)
        P = 1
        for k in range(d - 1, -1, -1):
            dk, rk, tk, rp = self.in_modes[k], rs[k + 1], self.out_modes[k], rs[k]
            z = self.cores[k](z.permute(0, 3, 1, 2).reshape(-1, P, dk * rk))   # (M, P, r_{k-1} t_k)
            z = z.reshape(-1, P, rp, tk).permute(0, 2, 3, 1)                    # (M, r_{k-1}, t_k, P)
            P = tk * P
            dn = self.in_modes[k - 1] if k > 0 else 1
            z = z.reshape(-1, dn, rp, P)
        return z.reshape(-1, P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            if self.stride != (1, 1):
                x = x[:, :, ::self.stride[0], ::self.stride[1]]
            N, S, H, W = x.shape
            y = self._product(x.permute(0, 2, 3, 1).reshape(-1, S))
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(N, H, W, -1).permute(0, 3, 1, 2)
        lead = x.shape[:-1]
        y = self._product(x.reshape(-1, x.shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (f"out_modes={self.out_modes}, in_modes={self.in_modes}, ranks={self.ranks}, "
                f"conv={self.conv}, stride={self.stride}, bias={self.bias is not None}")

    @classmethod
    def from_cores(cls, cores, bias: torch.Tensor | None, *, conv: bool = False, stride=(1, 1),
                   name: str | None = None) -> "TTMatrix":
        """The module holding ``cores`` (``(r_{k-1}, t_k, d_k, r_k)``, ``r_0 = r_d = 1``)."""
        cores = list(cores)
        if not cores or any(c.dim() != 4 for c in cores) or cores[0].shape[0] != 1 or cores[-1].shape[3] != 1 \
                or any(a.shape[3] != b.shape[0] for a, b in zip(cores, cores[1:])):
            raise InputError(f"{layer_label(name)}: TT-matrix cores of shapes {[tuple(c.shape) for c in cores]} "
                             "do not chain", hint="pass the cores as tt_matrix returned them")
        ref = cores[0]
        m = cls([c.shape[1] for c in cores], [c.shape[2] for c in cores], [c.shape[3] for c in cores[:-1]],
                bias=bias is not None, conv=conv, stride=stride, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for lin, G in zip(m.cores, cores):
                lin.weight.copy_(G.reshape(lin.weight.shape))
            if bias is not None:
                m.bias.copy_(bias)
        return m


def tt_conv_chain(layer: nn.Conv2d, factors, bias, conv_factory, geometry) -> nn.Sequential:
    """The TT-convolution chain (module docstring) from ``factors = (Cs, Ys, Xs, Ts)``, per-group
    factor lists; ``conv_factory`` builds one ``nn.Conv2d`` from ``(in, out, kernel, weight, bias, **geometry)``,
    ``geometry`` is the ``(kh x 1, 1 x kw)`` pair of :func:`ddtd.layers.builders.axis_geometry`."""
    Cs, Ys, Xs, Ts = factors
    T, S, g = layer.out_channels, layer.in_channels, layer.groups
    kh, kw = layer.kernel_size
    geo_h, geo_w = geometry
    R1, R2, R3 = Cs[0].shape[1], Ys[0].shape[2], Xs[0].shape[2]
    return nn.Sequential(
        conv_factory(S, g * R1, 1, torch.cat([C.T for C in Cs]), None, groups=g),
        conv_factory(g * R1, g * R2, (kh, 1), torch.cat([Y.permute(2, 0, 1).reshape(R2, R1, kh, 1) for Y in Ys]),
                     None, groups=g, **geo_h),
        conv_factory(g * R2, g * R3, (1, kw), torch.cat([X.permute(2, 0, 1).reshape(R3, R2, 1, kw) for X in Xs]),
                     None, groups=g, **geo_w),
        conv_factory(g * R3, T, 1, torch.cat([Tk.T for Tk in Ts]), bias, groups=g))
