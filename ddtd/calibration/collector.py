"""Forward hooks that accumulate each layer's input moments.

:class:`MomentCollector` owns the hooks; use it as a context manager so they are removed even
when the forward pass raises. Statistics are raw float64 sums (``sum x x^T``, ``sum x``) and a
count, normalised only when a solver asks for Sigma, so collections from several runs or
machines merge by adding.
"""

from __future__ import annotations

import fnmatch
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError, NumericalError
from .moments import ConvGeometry, assemble_blocks, conv_geometry, conv_moment_blocks, linear_input_moments

__all__ = ["LayerMoments", "LayerHooks", "MomentCollector", "InputCapture", "select_layers", "DEFAULT_MAX_DIM", "DEFAULT_COALESCE_BYTES",
           "COALESCE_LAYER_BYTES", "COALESCE_POSITIONS"]

#: Inputs are coalesced across batches (see :class:`MomentCollector`) in buffers of at most this
#: many bytes in all, at most :data:`COALESCE_LAYER_BYTES` per layer, until a buffer holds
#: :data:`COALESCE_POSITIONS` input positions (pixels of a feature map, rows of a Linear input).
DEFAULT_COALESCE_BYTES = 1 << 30
COALESCE_LAYER_BYTES = 64 << 20
COALESCE_POSITIONS = 1 << 18

#: Largest per-group patch length ``D`` stored by default. A ``D x D`` float64 accumulator of
#: 8192 is 512 MiB; larger layers (e.g. a VGG classifier on 25088 inputs) are skipped with a
#: reason recorded in the store, so a 24 GiB machine never runs out of memory.
DEFAULT_MAX_DIM = 8192


@dataclass
class LayerMoments:
    """Raw input statistics of one layer.

    ``xxT``: ``(g, D, D)`` float64 sum of ``x x^T``; ``x_sum``: ``(g, D)`` float64 sum of ``x``;
    ``count``: number of samples (patches / tokens) per group. ``meta`` holds the layer type,
    weight shape and geometry (stored as HDF5 attributes).
    """

    xxT: torch.Tensor
    x_sum: torch.Tensor
    count: int
    meta: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.xxT.shape[0]

    @property
    def dim(self) -> int:
        return self.xxT.shape[-1]

    def mean(self) -> torch.Tensor:
        """``mu = E[x]``, shape ``(g, D)``."""
        return self.x_sum / self.count

    def second_moment(self) -> torch.Tensor:
        """Uncentred ``Sigma = E[x x^T]``, shape ``(g, D, D)``."""
        return self.xxT / self.count

    def covariance(self) -> torch.Tensor:
        """Centred ``Sigma_c = E[x x^T] - mu mu^T``, shape ``(g, D, D)``."""
        mu = self.mean()
        return self.second_moment() - mu.unsqueeze(-1) * mu.unsqueeze(-2)

    def variance_fraction(self) -> float:
        """``trace(Sigma_c) / trace(Sigma)``: the share of the input energy that varies across
        samples (0 when every sample is the same, e.g. all-zero images; 0 also for no energy)."""
        total = float(torch.diagonal(self.second_moment(), dim1=-2, dim2=-1).sum())
        centred = float(torch.diagonal(self.covariance(), dim1=-2, dim2=-1).sum())
        return max(0.0, centred / total) if total > 0 else 0.0

    def to_cpu(self) -> "LayerMoments":
        return LayerMoments(self.xxT.cpu(), self.x_sum.cpu(), self.count, dict(self.meta))

    def add(self, other: "LayerMoments") -> "LayerMoments":
        return LayerMoments(self.xxT + other.xxT, self.x_sum + other.x_sum,
                            self.count + other.count, dict(self.meta))


def layer_meta(module: nn.Module) -> dict:
    """Attributes recorded for a layer: type, weight shape and, for convs, the geometry."""
    meta = {"type": type(module).__name__, "weight_shape": list(module.weight.shape)}
    if isinstance(module, nn.Conv2d):
        geo = conv_geometry(module)
        meta.update(
            kind="conv2d",
            kernel_size=list(geo.kernel_size),
            stride=list(geo.stride),
            padding=list(geo.pad),
            dilation=list(geo.dilation),
            groups=geo.groups,
            padding_mode=geo.padding_mode,
            unfold_order="channel,row,col",
        )
    else:
        meta.update(kind="linear", groups=1, unfold_order="feature")
    return meta


def _compile_patterns(patterns: str | list[str] | None):
    if not patterns:
        return None
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    compiled = []
    for p in patterns:
        p = p.strip()
        if p.startswith("re:"):
            compiled.append(re.compile(p[3:]).search)
        else:
            compiled.append(lambda name, p=p: fnmatch.fnmatchcase(name, p))
    return compiled


def select_layers(model: nn.Module, patterns: str | list[str] | None = None) -> list[str]:
    """Qualified names of the ``nn.Conv2d`` / ``nn.Linear`` layers matching ``patterns``.

    ``patterns`` is a list (or comma-separated string) of shell-style globs on qualified names
    (``layer1.*``, ``*.conv2``), or regular expressions prefixed with ``re:``; ``None`` selects
    every Conv2d / Linear. Raises :class:`InputError` when a pattern matches nothing.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    matchers = _compile_patterns(patterns)
    if matchers is None:
        return names
    chosen = [n for n in names if any(match(n) for match in matchers)]
    if not chosen:
        raise InputError(
            f"--layers {patterns!r} matches none of the model's {len(names)} Conv2d/Linear layers",
            hint="use glob patterns on qualified names, e.g. 'layer1.*' or '*.conv2'; "
            f"some names are: {', '.join(names[:6])}",
        )
    return chosen


class LayerHooks:
    """Owns forward pre-hooks on named layers: registered on ``__enter__``, removed on
    ``__exit__`` (also when the forward pass raises). Subclasses say what a hook does
    (:meth:`_make_hook`); :class:`MomentCollector` accumulates moments, :class:`InputCapture`
    keeps the inputs themselves."""

    model: nn.Module
    modules: dict
    hooked: list
    _handles: list

    def _make_hook(self, name: str):
        raise NotImplementedError

    def __enter__(self):
        for name in self.hooked:
            self._handles.append(self.modules[name].register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A Linear layer's input as rows ``(N, d)``: with a ``(B, L)`` token mask that matches a
    ``(B, L, d)`` input, only the positions it marks (padding excluded); else every position."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


class _StopForward(Exception):
    """Raised by :class:`InputCapture` after the last layer it captures: nothing after it is needed."""


class InputCapture(LayerHooks):
    """The inputs of named layers, batch by batch; the forward pass stops right after the last
    of them has its input (the rest of the model is not run).

    Example::

        xs = InputCapture(model, ["layer3.0.conv1"]).run(batches, device)["layer3.0.conv1"]
    """

    def __init__(self, model: nn.Module, names: list[str], *, forward=None, mask=None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.hooked = list(names)
        self._handles = []
        self.inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self._seen: set[str] = set()
        self.forward, self.mask_fn, self.mask = forward, mask, None

    def _make_hook(self, name: str):
        linear = isinstance(self.modules[name], nn.Linear)

        def hook(_module, inputs):
            x = inputs[0].detach()
            self.inputs[name].append(masked_rows(x, self.mask) if linear and x.dim() > 2 else x)
            self._seen.add(name)
            if len(self._seen) == len(self.hooked):
                raise _StopForward

        return hook

    @torch.no_grad()
    def run(self, batches, device) -> dict[str, list[torch.Tensor]]:
        """Run every batch (moved to ``device``) up to the captured layers; a Linear layer's
        ``(B, L, d)`` inputs are kept as the rows of the positions the token mask marks."""
        from ..inputs import call_model, to_device, token_mask

        with self:
            for b in batches:
                b = to_device(b, device)
                self._seen.clear()
                self.mask = token_mask(b, self.mask_fn)
                try:
                    call_model(self.model, b, self.forward)
                except _StopForward:
                    pass
        return self.inputs


class MomentCollector(LayerHooks):
    """Owns forward pre-hooks on selected layers and accumulates their input moments.

    Example::

        with MomentCollector(model, layers=["layer*"]) as col:
            for batch in loader:
                model(batch)
        stats = col.moments  # {qualified name: LayerMoments}

    ``conv_method`` picks the conv moment algorithm (see :func:`conv_moment_blocks`; the default
    ``"auto"`` uses fast Toom-Cook lag correlations where they are cheaper, ``"auto-direct"`` one
    GEMM per lag, ``"unfold"`` is the naive reference, kept for benchmarks). Layers whose patch length exceeds ``max_dim``
    are not hooked; ``skipped`` maps their name to
    the reason. Every batch is checked for NaN / Inf: a :class:`NumericalError` names the first
    layer whose input was not finite.

    **Coalescing.** A layer's moment products have a fixed cost per call (the ``D x D`` blocks are
    written once per call, and the border corrections of small feature maps are GEMMs whose inner
    dimension is the batch size), so layers with small inputs (deep layers, small images) are
    slow at the batch sizes at which inference is fastest. Each hook therefore copies its
    (raw, not unfolded) input into a per-layer buffer that holds about
    :data:`COALESCE_POSITIONS` input positions, at most ``coalesce_bytes / layers`` (and at most
    :data:`COALESCE_LAYER_BYTES`), and computes the moments when the buffer is full, when the
    context manager exits (without an error) and when :attr:`moments` is read. The sums are the
    same (up to float rounding) as one call per batch; the buffers take at most
    ``coalesce_bytes`` in all. ``coalesce_bytes=0`` computes every batch as it comes. Buffers
    that fill together are computed together, on a multi-threaded CPU one layer per thread
    (``parallel_flush=False``: one after the other).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | list[str] | None = None,
        max_dim: int = DEFAULT_MAX_DIM,
        accumulate_device: torch.device | str | None = None,
        conv_method: str = "auto",
        coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
        parallel_flush: bool = True,
    ):
        if coalesce_bytes < 0:
            raise ValueError(f"coalesce_bytes must be >= 0, got {coalesce_bytes}")
        self.model = model
        self.coalesce_bytes = coalesce_bytes
        self.parallel_flush = parallel_flush
        self._pending: dict[str, list] = {}  # per layer: [buffer, rows filled]
        self.conv_method = conv_method
        self.max_dim = max_dim
        self.names = select_layers(model, layers)
        self.modules = dict(model.named_modules())
        self.accumulate_device = accumulate_device
        self._acc: dict[str, dict] = {}  # float64 running sums per layer (Sigma as offset blocks)
        self.mask: torch.Tensor | None = None  # the (B, L) token mask of the batch being run
        self._moments: dict[str, LayerMoments] | None = None
        self.skipped: dict[str, str] = {}
        self._handles: list = []
        self._geos: dict[str, ConvGeometry] = {}
        for name in self.names:
            module = self.modules[name]
            if isinstance(module, nn.Conv2d):
                self._geos[name] = conv_geometry(module)
                dim = self._geos[name].dim
            else:
                dim = module.in_features
            if dim > max_dim:
                self.skipped[name] = (
                    f"input dimension {dim} > max_dim {max_dim}: its float64 Sigma would take "
                    f"{dim * dim * 8 / 2**30:.1f} GiB (raise --max-dim to store it)"
                )
        self.hooked = [n for n in self.names if n not in self.skipped]

    # -- context manager -------------------------------------------------------------------
    def __exit__(self, exc_type, *exc) -> None:
        self.remove()
        if exc_type is None:
            self.flush()
        else:  # an interrupted pass: its partial batches are not part of the statistics
            self._pending.clear()

    # -- hooks -----------------------------------------------------------------------------
    def _make_hook(self, name: str):
        module = self.modules[name]
        geo = self._geos.get(name)

        def hook(_module, inputs):
            x = inputs[0].detach()
            with torch.no_grad():
                # NaN / Inf anywhere in x makes its sum non-finite (checked before buffering, so
                # the error names the layer and the batch that produced it).
                total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
                if not torch.isfinite(total):
                    raise self._nan_error(name)
                if geo is None and x.dim() != 2:
                    x = masked_rows(x, self.mask)
                elif geo is not None and x.dim() == 3:
                    x = x.unsqueeze(0)
                self._push(name, x)

        return hook

    @staticmethod
    def _nan_error(name: str) -> NumericalError:
        return NumericalError(
            f"layer '{name}' received NaN or Inf activations",
            hint="check the model's weights and the input normalisation "
            "(--mean/--std); a model that overflows in half precision needs float32",
        )

    def _push(self, name: str, x: torch.Tensor) -> None:
        """Buffer ``x`` (a batch along dim 0) for layer ``name``; compute when the buffer is full."""
        row_bytes = x[:1].numel() * x.element_size()
        positions = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
        layer_bytes = min(COALESCE_LAYER_BYTES, self.coalesce_bytes // max(1, len(self.hooked)))
        capacity = min(layer_bytes // max(1, row_bytes), -(-COALESCE_POSITIONS // positions))
        pending = self._pending.get(name)
        if pending is not None and (pending[0].shape[1:] != x.shape[1:] or pending[0].dtype != x.dtype
                                    or pending[0].device != x.device):
            self._compute_buffers([name], release=True)  # another input shape: a new buffer
            pending = None
        elif pending is not None and pending[1] + x.shape[0] > pending[0].shape[0]:
            # Full: computed together with every other buffer that is at least half full (the
            # layers around it fill at the same pace), side by side on several threads.
            group = [n_ for n_, p in self._pending.items() if 2 * p[1] >= p[0].shape[0]]
            self._compute_buffers(group if name in group else group + [name], release=False)
        if x.shape[0] > capacity // 2:  # large enough on its own: no copy
            self._compute(name, x)
            return
        if pending is None:
            pending = self._pending[name] = [x.new_empty((capacity,) + tuple(x.shape[1:])), 0]
        buf, filled = pending
        buf[filled : filled + x.shape[0]].copy_(x)  # a copy: the model may modify x in place later
        pending[1] = filled + x.shape[0]

    def flush(self) -> None:
        """Compute the moments of every buffered input and free the buffers (called on exit
        and by :attr:`moments`)."""
        self._compute_buffers(list(self._pending), release=True)

    def _compute_buffers(self, names: list[str], release: bool) -> None:
        """Compute the buffered inputs of layers ``names`` and empty them; ``release`` frees the
        buffers, otherwise they are kept for the next batches (a fresh buffer per flush
        page-faults on every write: copying into fresh memory ran at 2.4 GB/s against 27 GB/s
        into a warm buffer).

        On a CPU with several threads the layers are computed side by side, one layer per
        thread, each single-threaded: the moment code is many mid-sized GEMMs and copies that
        speed up less with a second thread than independent layers do (measured: 6-12% less
        calibration time on a ResNet-18, 2 cores). The results are accumulated in layer order.
        """
        work = []
        for name in names:
            pending = self._pending.pop(name, None) if release else self._pending.get(name)
            if pending is not None and pending[1] > 0:
                work.append((name, pending[0][: pending[1]]))
                pending[1] = 0
        before = torch.get_num_threads()
        threads = min(len(work), before)
        if threads > 1 and self.parallel_flush and all(x.device.type == "cpu" for _, x in work):
            # torch's thread count is process-wide for threads that start later (and setting it
            # from a worker thread can change the caller's): set 1 here, restore it after.
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    futures = [pool.submit(self._layer_moments, name, x) for name, x in work]
                    results = [f.result() for f in futures]
            finally:
                torch.set_num_threads(before)
            for (name, _), res in zip(work, results):
                self._check_and_accumulate(name, *res)
        else:
            for name, x in work:
                self._compute(name, x)

    def _layer_moments(self, name: str, x: torch.Tensor):
        geo = self._geos.get(name)
        if geo is not None:
            return conv_moment_blocks(x, geo, method=self.conv_method)
        return linear_input_moments(x)

    def _compute(self, name: str, x: torch.Tensor) -> None:
        self._check_and_accumulate(name, *self._layer_moments(name, x))

    def _check_and_accumulate(self, name: str, parts, x_sum, count) -> None:
        # Finite inputs can still overflow float32 products (x^2 on the diagonal).
        if isinstance(parts, dict):
            diag = sum(torch.diagonal(b, dim1=1, dim2=2).sum() for (a, c), b in parts.items() if a == c)
        else:
            diag = torch.diagonal(parts, dim1=1, dim2=2).sum()
        if not (torch.isfinite(x_sum).all() and torch.isfinite(torch.as_tensor(diag))):
            raise self._nan_error(name)
        self._accumulate(name, parts, x_sum, count)

    def _accumulate(self, name, parts, x_sum, count) -> None:
        dev = self.accumulate_device or x_sum.device
        self._moments = None
        acc = self._acc.setdefault(name, {"blocks": {}, "dense": None, "x_sum": None, "count": 0})
        x_sum = x_sum.to(dev, torch.float64)
        acc["x_sum"] = x_sum if acc["x_sum"] is None else acc["x_sum"].add_(x_sum)
        acc["count"] += count
        if isinstance(parts, dict):
            for key, blk in parts.items():
                old = acc["blocks"].get(key)
                if old is None:
                    acc["blocks"][key] = blk.to(dev, torch.float64)
                else:
                    old.add_(blk.to(dev))  # float32 products added into the float64 sum in place
        else:
            dense = parts.to(dev, torch.float64)
            acc["dense"] = dense if acc["dense"] is None else acc["dense"].add_(dense)

    @property
    def moments(self) -> dict[str, LayerMoments]:
        """``{layer name: LayerMoments}`` of everything accumulated so far (assembled once)."""
        if self._pending:
            self.flush()
        if self._moments is None:
            out = {}
            for name, acc in self._acc.items():
                module = self.modules[name]
                xxT = acc["dense"]
                if xxT is None:  # a conv accumulated as offset blocks
                    xxT = assemble_blocks(acc["blocks"], self._geos[name], symmetric=True, like=acc["x_sum"])
                out[name] = LayerMoments(xxT, acc["x_sum"], acc["count"], layer_meta(module))
            self._moments = out
        return self._moments
