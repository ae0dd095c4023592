"""``LowRankSparse``: a layer computing ``y = L x + S x + b`` for a low-rank ``L`` and a sparse ``S``.

``L`` runs as ddtd's factor chain (``build_svd`` / ``build_tucker2`` / ``build_tt``, no bias; a
TT-matrix low-rank part is a :class:`ddtd.layers.tt.TTMatrix`), ``S`` is stored
compactly: ``values (nnz,)`` (a parameter) and ``index (nnz,)`` (an ``int32`` buffer with the
flat position ``t * D + d`` in the ``T x D`` weight matrix, ``D = S*kh*kw`` in unfold order).
So the state dict holds exactly the factors, ``nnz`` values, ``nnz`` int32 indices and the bias.

Grouped convs (weight ``(T, S/g, kh, kw)``): the matrix is ``(T, D_g)``, ``D_g = (S/g) kh kw``
(flat index ``t * D_g + d`` = the position in the kernel tensor).  ``S/g > 1``: the low-rank part
is the grouped chain of :func:`ddtd.layers.builders.build_svd` / ``build_tucker2`` (factors with
a leading group dim).  Depthwise (``S/g = 1``, ``g > 1``) with 2-D svd factors ``A (T, r)``,
``B (r, kh*kw)``: :class:`SharedBasis`, every output filter a combination of ``r`` shared basis
filters (``r (T + kh kw)`` parameters; ``'chain'`` runs the basis on every channel, then mixes).

Forward (``forward_mode``), all exact w.r.t. the dense ``W~ = L + S``:

* ``'merged'`` (default): build ``W~ = L + scatter(index, values)`` (``T*r*D`` multiply-adds for
  svd; cached outside autograd until a tensor of the module changes) and run one conv / linear
  with the original geometry, so the latency is the dense layer's: the fastest of the three
  (``benchmarks/lrs.py``, benchmarks/results/lrs.txt); the chain plus a densified sparse conv
  runs two or three convolutions, and ``torch.sparse.mm`` at the densities a compression
  budget leaves (5-25%) is slower than the dense matmul it replaces.  The point of the format
  is storage (bytes), not speed.
* ``'chain'``: ``chain(x)`` + a conv / linear with the densified sparse weight.
* ``'sparse'``: ``chain(x)`` + ``torch.sparse.mm`` (Linear and ungrouped 1x1 convs with stride
  1 and no padding; other convs fall back to ``'chain'``).

Rebuild: :meth:`LowRankSparse.describe` returns plain data; :meth:`LowRankSparse.from_description`
builds the same module with placeholder tensors, so ``load_state_dict`` of a state dict loaded
with ``torch.load(..., weights_only=True)`` restores it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ddtd.errors import InputError, layer_label

from .builders import build_svd, build_tt, build_tucker2

__all__ = ["LowRankSparse", "SharedBasis", "FORWARD_MODES", "layer_from_spec"]

FORWARD_MODES = ("merged", "chain", "sparse")



def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _spec_of(layer: nn.Module, name=None) -> dict:
    if isinstance(layer, nn.Conv2d):
        pad = layer.padding if isinstance(layer.padding, str) else _pair(layer.padding)
        return {"type": "Conv2d", "in_channels": int(layer.in_channels),
                "out_channels": int(layer.out_channels), "kernel_size": _pair(layer.kernel_size),
                "stride": _pair(layer.stride), "padding": pad, "dilation": _pair(layer.dilation),
                "groups": int(layer.groups), "padding_mode": str(layer.padding_mode),
                "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        return {"type": "Linear", "in_features": int(layer.in_features),
                "out_features": int(layer.out_features), "bias": layer.bias is not None}
    raise InputError(f"{layer_label(name)}: cannot build LowRankSparse for {type(layer).__name__}",
                     hint="only nn.Conv2d (any groups) and nn.Linear layers")


def layer_from_spec(spec: dict, *, bias: bool | None = None, dtype=None, device=None) -> nn.Module:
    """A zero-initialised ``nn.Conv2d`` / ``nn.Linear`` with the geometry of ``spec``."""
    b = spec["bias"] if bias is None else bias
    if spec["type"] == "Linear":
        m = nn.Linear(spec["in_features"], spec["out_features"], bias=b, dtype=dtype, device=device)
    elif spec["type"] == "Conv2d":
        pad = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
        m = nn.Conv2d(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                      stride=tuple(spec["stride"]), padding=pad, dilation=tuple(spec["dilation"]),
                      groups=spec["groups"], bias=b, padding_mode=spec["padding_mode"],
                      dtype=dtype, device=device)
    else:
        raise InputError(f"unknown layer type {spec.get('type')!r} in description",
                         hint="the description must come from LowRankSparse.describe()")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def _pad_geometry(spec: dict) -> tuple:
    """``F.pad`` amounts ``(left, right, top, bottom)`` of a conv spec (PyTorch's split for
    ``'same'``: ``left = d (k - 1) // 2``)."""
    kh, kw = spec["kernel_size"]
    dh, dw = spec["dilation"]
    if spec["padding"] == "valid":
        return (0, 0, 0, 0)
    if spec["padding"] == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = spec["padding"]
    return (pw, pw, ph, ph)


def _conv_spec(x, w, b, spec: dict, groups: int):
    """``conv2d`` with the geometry of ``spec`` (stride, padding incl. ``'same'``, dilation,
    padding_mode) and ``groups``."""
    if spec["padding_mode"] != "zeros":
        x = F.pad(x, _pad_geometry(spec), mode=spec["padding_mode"])
        return F.conv2d(x, w, b, tuple(spec["stride"]), 0, tuple(spec["dilation"]), groups)
    pad = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
    return F.conv2d(x, w, b, tuple(spec["stride"]), pad, tuple(spec["dilation"]), groups)


class SharedBasis(nn.Module):
    """Low-rank part of a depthwise conv (``S/g = 1``): ``K~[t, 0] = sum_j A[t, j] B[j]``, i.e.
    ``r`` basis filters ``B (r, kh, kw)`` shared by all channels and mixing coefficients
    ``A (T, r)``; ``r (T + kh kw)`` weights (:func:`ddtd.solvers.lrs.lowrank_sparse` fits it).

    Forward (the chain): every input channel is convolved with the ``r`` basis filters (one conv
    of the ``(N C, 1, H, W)`` view with the original geometry), then output channel ``t`` mixes
    the ``r`` responses of its input channel ``t // (T/C)`` with ``A[t]``.  Exact: conv is linear
    in the kernel, and padding acts per channel.

    Args:
        A: ``(T, r)``; B: ``(r, kh*kw)`` or ``(r, kh, kw)``.
        spec: the depthwise conv's spec (``LowRankSparse`` geometry dict).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, spec: dict, name: str | None = None):
        super().__init__()
        kh, kw = spec["kernel_size"]
        T, C = spec["out_channels"], spec["in_channels"]
        A = torch.as_tensor(A)
        B = torch.as_tensor(B)
        r = A.shape[1] if A.dim() == 2 else -1
        if A.dim() != 2 or A.shape[0] != T or B.numel() != r * kh * kw or B.shape[0] != r:
            raise InputError(f"{layer_label(name)}: shared-basis factors A {tuple(A.shape)}, B "
                             f"{tuple(B.shape)} do not fit a depthwise conv with T={T}, kernel "
                             f"{kh}x{kw}", hint=f"expected A ({T}, r) and B (r, {kh * kw})")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InputError(f"{layer_label(name)}: shared-basis factors contain NaN or Inf",
                             hint="re-run the solver for this layer")
        self.spec = dict(spec)
        self.T, self.C, self.kh, self.kw = int(T), int(C), int(kh), int(kw)
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().reshape(r, kh, kw).clone())

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    def kernel(self) -> torch.Tensor:
        """``(T, 1, kh, kw)``."""
        return (self.A @ self.B.reshape(self.rank, -1)).reshape(self.T, 1, self.kh, self.kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = _conv_spec(x.reshape(n * c, 1, h, w), self.B[:, None], None, self.spec, 1)
        y = y.reshape(n, c, self.rank, *y.shape[-2:])
        if self.T != c:
            y = y.repeat_interleave(self.T // c, dim=1)
        return torch.einsum("ntrhw,tr->nthw", y, self.A)

    def extra_repr(self) -> str:
        return f"T={self.T}, r={self.rank}, kernel={self.kh}x{self.kw}"


class LowRankSparse(nn.Module):
    """``y = L x + S x + b`` with the original layer's geometry.

    Args:
        layer: the original ``nn.Conv2d`` (any groups incl. depthwise, stride / padding /
            dilation / padding_mode) or ``nn.Linear``; gives geometry, dtype, device.
        lowrank: ``'svd'`` (factors ``A (T, r)``, ``B (r, D)``), ``'tucker2'`` (``U (T, R1)``,
            ``core (R1, R2, kh, kw)``, ``V (S, R2)``), ``'tt'`` (TT-matrix cores ``G_k (r_{k-1},
            t_k, d_k, r_k)``; a Linear layer or an ungrouped, unpadded 1x1 conv) or ``'none'``
            (pure sparse, ``()``).
            Grouped (``S/g > 1``): a leading group dim on every factor (``A (g, T/g, r)``,
            ``B (g, r, D_g)``, ...).  Depthwise: svd factors ``A (T, r)``, ``B (r, kh*kw)``
            (2-D: :class:`SharedBasis`) or per-group ``(g, T/g, r)``, ``(g, r, kh*kw)``.
        factors: the low-rank factors.
        indices: ``(nnz, 2)`` int64 ``(t, d)`` or ``(nnz,)`` flat ``t * D + d`` (grouped:
            ``D = D_g``).
        values: ``(nnz,)`` additive sparse values (:meth:`LRSResult.sparse_delta`).
        bias: ``(T,)`` or ``None`` (keeps the layer's bias).
        forward_mode: ``'merged'``, ``'chain'`` or ``'sparse'`` (module docstring).
        name: layer name for error messages.
    """

    def __init__(self, layer: nn.Module, lowrank: str, factors, indices: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None = None, *,
                 forward_mode: str = "merged", name: str | None = None):
        super().__init__()
        spec = _spec_of(layer, name)
        if forward_mode not in FORWARD_MODES:
            raise InputError(f"{layer_label(name)}: unknown forward_mode {forward_mode!r}",
                             hint=f"use one of {FORWARD_MODES}")
        if lowrank not in ("svd", "tucker2", "tt", "none"):
            raise InputError(f"{layer_label(name)}: unknown lowrank format {lowrank!r}",
                             hint="use 'svd', 'tucker2', 'tt' or 'none'")
        self.spec = spec
        self.kind = lowrank
        self.forward_mode = forward_mode
        self.name = name
        w = layer.weight
        dt, dev = w.dtype, w.device
        self.T = int(w.shape[0])
        self.D = int(math.prod(w.shape[1:]))
        self.wshape = tuple(w.shape)
        self.groups = int(spec.get("groups", 1))
        # the chain without bias: a bias-free placeholder of the same geometry
        plain = layer_from_spec(spec, bias=False, dtype=dt, device=dev)
        if lowrank == "svd" and self._depthwise() and len(factors) == 2 \
                and torch.as_tensor(factors[0]).dim() == 2:
            A, B = (torch.as_tensor(f).detach().to(device=dev, dtype=dt) for f in factors)
            self.lowrank = SharedBasis(A, B, spec, name=name)
        elif lowrank == "svd":
            self.lowrank = build_svd(plain, *factors, name=name)
        elif lowrank == "tucker2":
            if spec["type"] != "Conv2d":
                raise InputError(f"{layer_label(name)}: tucker2 needs a Conv2d",
                                 hint="use lowrank 'svd' for Linear layers")
            self.lowrank = build_tucker2(plain, *factors, name=name)
        elif lowrank == "tt":
            self.lowrank = build_tt(plain, *factors, name=name)
        else:
            self.lowrank = None
        idx = torch.as_tensor(indices)
        if idx.dim() == 2:
            if idx.shape[1] != 2:
                raise InputError(f"{layer_label(name)}: indices have shape {tuple(idx.shape)}",
                                 hint="pass (nnz, 2) (row, col) or flat (nnz,) indices")
            idx = idx[:, 0].to(torch.int64) * self.D + idx[:, 1].to(torch.int64)
        vals = torch.as_tensor(values)
        if idx.dim() != 1 or vals.shape != idx.shape:
            raise InputError(f"{layer_label(name)}: {tuple(idx.shape)} indices for "
                             f"{tuple(vals.shape)} values", hint="one index per value")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.T * self.D):
            raise InputError(f"{layer_label(name)}: sparse index outside the {self.T} x {self.D} weight",
                             hint="the sparse part belongs to a different layer")
        if self.T * self.D >= 2 ** 31:
            raise InputError(f"{layer_label(name)}: T*D too large for int32 indices",
                             hint="leave this layer dense")
        if not torch.isfinite(vals).all():
            raise InputError(f"{layer_label(name)}: sparse values contain NaN or Inf",
                             hint="re-run the solver for this layer")
        self.register_buffer("index", idx.to(device=dev, dtype=torch.int32))
        self.values = nn.Parameter(vals.detach().to(device=dev, dtype=dt).clone())
        if bias is None and layer.bias is not None:
            bias = layer.bias.detach()
        if bias is not None:
            if tuple(bias.shape) != (self.T,):
                raise InputError(f"{layer_label(name)}: bias has shape {tuple(bias.shape)}, expected "
                                 f"({self.T},)", hint="one bias value per output channel")
            self.bias = nn.Parameter(bias.detach().to(device=dev, dtype=dt).clone())
        else:
            self.bias = None
        self.spec = dict(spec, bias=self.bias is not None)

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def from_result(cls, layer: nn.Module, result, bias: torch.Tensor | None = None, *,
                    forward_mode: str = "merged", name: str | None = None) -> "LowRankSparse":
        """Build from an :class:`ddtd.solvers.lrs.LRSResult` fitted to ``layer.weight``."""
        if tuple(result.shape) != tuple(layer.weight.shape) and \
                (result.T, result.D) != (layer.weight.shape[0], int(math.prod(layer.weight.shape[1:]))):
            raise InputError(f"{layer_label(name)}: result of shape {result.shape} does not fit the "
                             f"weight {tuple(layer.weight.shape)}", hint="fit this layer's weight")
        fac = result.factors
        if result.lowrank == "svd":
            fac = (fac[0], fac[1])
        return cls(layer, result.lowrank, fac, result.indices, result.sparse_delta(), bias,
                   forward_mode=forward_mode, name=name)

    def _depthwise(self) -> bool:
        return self.groups > 1 and self.wshape[1] == 1

    def _shared(self) -> bool:
        return isinstance(self.lowrank, SharedBasis)

    def describe(self) -> dict:
        """Plain-data description (str / int / bool / list only).  ``rank`` is per group for a
        grouped chain (tt: the bond ranks, with ``modes`` ``[out_modes, in_modes]``); ``layout``
        is ``'shared'`` for a depthwise :class:`SharedBasis`, else ``'chain'``."""
        g = self.groups
        if self._shared():
            rank = [self.lowrank.rank]
        elif self.kind == "svd":
            rank = [int(self.lowrank[0].weight.shape[0]) // g]
        elif self.kind == "tucker2":
            rank = [int(self.lowrank[1].weight.shape[0]) // g,
                    int(self.lowrank[1].weight.shape[1])]
        elif self.kind == "tt":
            rank = list(self.lowrank.ranks)
        else:
            rank = [0]
        desc = {"kind": "lrs", "layer": dict(self.spec), "lowrank": self.kind, "rank": rank,
                "nnz": int(self.values.numel()), "bias": self.bias is not None,
                "forward_mode": self.forward_mode, "index_dtype": "int32",
                "layout": "shared" if self._shared() else "chain"}
        if self.kind == "tt":
            desc["modes"] = [list(self.lowrank.out_modes), list(self.lowrank.in_modes)]
        return desc

    @classmethod
    def from_description(cls, desc: dict, *, dtype: torch.dtype = torch.float32, device=None,
                         name: str | None = None) -> "LowRankSparse":
        """Rebuild the module structure from :meth:`describe` with zero placeholders; then
        ``load_state_dict`` restores it."""
        need = ("kind", "layer", "lowrank", "rank", "nnz", "bias")
        if not isinstance(desc, dict) or desc.get("kind") != "lrs" or any(k not in desc for k in need):
            raise InputError(f"{layer_label(name)}: not a LowRankSparse description: {desc!r}",
                             hint="pass the dict returned by LowRankSparse.describe()")
        spec = desc["layer"]
        layer = layer_from_spec(spec, bias=bool(desc["bias"]), dtype=dtype, device=device)
        T = layer.weight.shape[0]
        D = int(math.prod(layer.weight.shape[1:]))
        g = int(spec.get("groups", 1)) if spec.get("type") == "Conv2d" else 1
        Tg = T // g
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        if desc["lowrank"] == "svd":
            r = int(desc["rank"][0])
            depthwise = g > 1 and spec["in_channels"] == g
            layout = desc.get("layout", "shared" if depthwise else "chain")
            if g == 1 or layout == "shared":
                factors = (z(T, r), z(r, D))
            else:
                factors = (z(g, Tg, r), z(g, r, D))
        elif desc["lowrank"] == "tucker2":
            R1, R2 = (int(x) for x in desc["rank"])
            _, S, kh, kw = layer.weight.shape
            if g == 1:
                factors = (z(T, R1), z(R1, R2, kh, kw), z(S, R2))
            else:
                factors = (z(g, Tg, R1), z(g, R1, R2, kh, kw), z(g, S, R2))
        elif desc["lowrank"] == "tt":
            if "modes" not in desc:
                raise InputError(f"{layer_label(name)}: a TT low-rank description needs 'modes'",
                                 hint="pass the dict returned by LowRankSparse.describe()")
            om, im = desc["modes"]
            rs = [1] + [int(r) for r in desc["rank"]] + [1]
            factors = tuple(z(rs[k], int(t), int(d), rs[k + 1]) for k, (t, d) in enumerate(zip(om, im)))
        else:
            factors = ()
        nnz = int(desc["nnz"])
        return cls(layer, desc["lowrank"], factors, torch.zeros(nnz, dtype=torch.int64),
                   z(nnz), None, forward_mode=desc.get("forward_mode", "merged"), name=name)

    # ---------------------------------------------------------------- dense weights
    def lowrank_weight(self) -> torch.Tensor:
        """``L`` as ``(T, D)`` (grouped: ``(T, D_g)``, group blocks stacked)."""
        ch, g, T = self.lowrank, self.groups, self.T
        if self._shared():
            return ch.kernel().reshape(T, self.D)
        if self.kind == "svd":
            A = ch[1].weight.reshape(g, T // g, -1)                        # (g, T_g, r)
            B = ch[0].weight.reshape(g, A.shape[2], self.D)                # (g, r, D_g)
            return (A @ B).reshape(T, self.D)
        if self.kind == "tucker2":
            R2 = ch[0].weight.shape[0] // g
            R1 = ch[1].weight.shape[0] // g
            V = ch[0].weight.reshape(g, R2, -1)                            # (g, R2, S_g)
            G = ch[1].weight.reshape(g, R1, *ch[1].weight.shape[1:])      # (g, R1, R2, kh, kw)
            U = ch[2].weight.reshape(g, T // g, R1)                        # (g, T_g, R1)
            return torch.einsum("gta,gabij,gbs->gtsij", U, G, V).reshape(T, self.D)
        if self.kind == "tt":
            return ch.matrix()
        return torch.zeros(self.T, self.D, dtype=self.values.dtype, device=self.values.device)

    def sparse_weight(self) -> torch.Tensor:
        """``S`` as a dense ``(T, D)`` matrix."""
        S = torch.zeros(self.T * self.D, dtype=self.values.dtype, device=self.values.device)
        S = S.index_put((self.index.long(),), self.values, accumulate=True)
        return S.reshape(self.T, self.D)

    def weight(self) -> torch.Tensor:
        """``W~ = L + S`` shaped like the original weight."""
        return (self.lowrank_weight() + self.sparse_weight()).reshape(self.wshape)

    # ---------------------------------------------------------------- forward
    def _pad_geometry(self):
        return _pad_geometry(self.spec)

    def _conv(self, x, w, b):
        return _conv_spec(x, w, b, self.spec, self.groups)

    def _dense(self, x, w, b):
        if self.spec["type"] == "Linear":
            return F.linear(x, w, b)
        return self._conv(x, w, b)

    def _merged_weight(self) -> torch.Tensor:
        """``W~``; cached while no tensor of the module changes (keyed on storage pointers and
        version counters, so ``load_state_dict``, ``.to()`` or in-place edits invalidate it) and
        only outside autograd (with grad enabled it is rebuilt so gradients reach the factors)."""
        tensors = list(self.parameters()) + [self.index]
        if torch.is_grad_enabled() and any(p.requires_grad for p in tensors):
            return self.weight()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        cache = self.__dict__.get("_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.weight())
            self.__dict__["_cache"] = cache
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "merged" or (self.lowrank is None and self.forward_mode == "chain"):
            return self._dense(x, self._merged_weight(), self.bias)
        y = self.lowrank(x) if self.lowrank is not None else None
        if self.forward_mode == "sparse" and self._sparse_ok():
            z = self._sparse_apply(x)
        else:
            z = self._dense(x, self.sparse_weight().reshape(self.wshape), None)
        y = z if y is None else y + z
        if self.bias is not None:
            y = y + (self.bias if self.spec["type"] == "Linear" else self.bias[:, None, None])
        return y

    def _sparse_ok(self) -> bool:
        s = self.spec
        if s["type"] == "Linear":
            return True
        return (self.groups == 1 and s["kernel_size"] == [1, 1] and s["stride"] == [1, 1]
                and s["padding"] in ([0, 0], "valid", "same"))

    def _sparse_apply(self, x):
        idx = self.index.long()
        rows, cols = idx // self.D, idx % self.D
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Sm = torch.sparse_coo_tensor(torch.stack([rows, cols]), self.values, (self.T, self.D),
                                         check_invariants=False).coalesce().to_sparse_csr()
        if self.spec["type"] == "Linear":
            X = x.reshape(-1, self.D)
            return torch.sparse.mm(Sm, X.T).T.reshape(*x.shape[:-1], self.T)
        n, c, h, w = x.shape
        X = x.permute(1, 0, 2, 3).reshape(c, -1)
        return torch.sparse.mm(Sm, X).reshape(self.T, n, h, w).permute(1, 0, 2, 3)

    # ---------------------------------------------------------------- counting
    def count_params(self) -> int:
        """Stored floating-point elements: factors + nonzero values + bias."""
        return sum(p.numel() for p in self.parameters())

    def index_bytes(self) -> int:
        return self.index.numel() * self.index.element_size()

    def nbytes(self) -> int:
        """Bytes of the state dict's tensors: every parameter plus the int32 index buffer."""
        return sum(p.numel() * p.element_size() for p in self.parameters()) + self.index_bytes()

    def extra_repr(self) -> str:
        grp = f" groups={self.groups}" if self.groups > 1 else ""
        return (f"{self.spec['type']} T={self.T} D={self.D}{grp} lowrank={self.kind} "
                f"nnz={self.values.numel()} forward={self.forward_mode}")
