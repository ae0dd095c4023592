"""The covariance store: one HDF5 file of raw input moments per layer.

Layout (readable with any HDF5 tool, e.g. ``h5ls -r``)::

    /                       attrs: ddtd_version, format_version, fingerprint, layers (JSON list of
                                   [name, type, weight shape] for every Conv2d / Linear of the
                                   model), num_images, transform (JSON), seed, sources (JSON),
                                   skipped (JSON {layer: reason})
    /layers/<name>/xxT      float64 (g, D, D)  sum of x x^T over all samples
    /layers/<name>/x_sum    float64 (g, D)     sum of x
    /layers/<name>/count    int64 ()           samples per group
                            attrs: type, kind, weight_shape, kernel_size, stride, padding
                                   (top, bottom, left, right), dilation, groups, padding_mode,
                                   unfold_order
    every dataset           attr sha256: checksum of its bytes, verified on read

Sums add, so stores from several runs or machines merge exactly (:func:`merge_stores`); each
run's entry in ``sources`` carries a random ``id``, and a merge refuses the same run twice. A
store is tied to one architecture by its fingerprint; :func:`check_model` names the first layer
that differs. Files are written atomically.

Reading a layer checks its numbers before any solver sees them (:func:`validate_moments`):
checksums, finite values, a symmetric ``xxT`` with a non-negative diagonal, the Cauchy-Schwarz
bound ``x_sum_i^2 <= count * xxT_ii`` (which every set of samples satisfies), positive
semidefiniteness within round-off (a Cholesky factorisation of ``xxT + 1e-6 * trace(xxT) * I``:
products accumulated from float32 activations carry relative errors near 1e-7 of the largest
eigenvalue, itself at most the trace),
and a positive count. A damaged store is refused with the
layer and dataset named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..atomic import atomic_path, check_interrupt
from ..errors import InputError, StoreMismatchError
from .collector import LayerMoments

log = logging.getLogger("ddtd")

__all__ = [
    "STORE_FORMAT",
    "StoreInfo",
    "CovarianceStore",
    "model_layers",
    "fingerprint",
    "write_store",
    "merge_stores",
    "validate_moments",
    "new_source_id",
]

STORE_FORMAT = 1


def model_layers(model: nn.Module) -> list[list]:
    """``[name, type, weight shape]`` for every Conv2d / Linear, in module order."""
    return [
        [name, type(m).__name__, list(m.weight.shape)]
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def fingerprint(layers: list[list]) -> str:
    return hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:16]


def _key(name: str) -> str:
    return name.replace("/", "%2F") or "%ROOT"


def _unkey(key: str) -> str:
    return "" if key == "%ROOT" else key.replace("%2F", "/")


def new_source_id() -> str:
    """A random id for one calibration run (recorded in ``sources``)."""
    return uuid.uuid4().hex


def _checksum(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


#: Relative tolerances of :func:`validate_moments` (float64 sums of float32 products).
SYMMETRY_RTOL = 1e-6
PSD_JITTER = 1e-6


def validate_moments(name: str, lm: LayerMoments, where: str = "the store") -> None:
    """Raise :class:`InputError` unless ``lm`` could be the raw moments of real data (see the
    module docstring for the checks)."""
    hint = "the store is damaged: re-run `ddtd calibrate` (keep the images), or restore it from a copy"
    xxT, xs = lm.xxT.to(torch.float64), lm.x_sum.to(torch.float64)
    if xxT.dim() != 3 or xxT.shape[-1] != xxT.shape[-2] or xs.shape != xxT.shape[:2]:
        raise InputError(f"layer '{name}' in {where}: xxT {tuple(xxT.shape)} and x_sum {tuple(xs.shape)} "
                         "do not have the shapes (g, D, D) and (g, D)", hint=hint)
    if not isinstance(lm.count, int) or lm.count < 1:
        raise InputError(f"layer '{name}' in {where}: sample count {lm.count} is not a positive integer", hint=hint)
    for label, t in (("xxT", xxT), ("x_sum", xs)):
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"layer '{name}' in {where}: {label} holds NaN / Inf", hint=hint)
    diag = torch.diagonal(xxT, dim1=-2, dim2=-1)
    scale = diag.abs().amax(-1).clamp_min(1e-300)  # (g,)
    if bool((diag < -SYMMETRY_RTOL * scale[:, None]).any()):
        raise InputError(f"layer '{name}' in {where}: xxT has a negative diagonal entry (a sum of squares)",
                         hint=hint)
    asym = (xxT - xxT.transpose(-1, -2)).abs().amax((-1, -2))
    if bool((asym > SYMMETRY_RTOL * scale).any()):
        raise InputError(f"layer '{name}' in {where}: xxT is not symmetric (max |xxT - xxT^T| = "
                         f"{float(asym.max()):.3g})", hint=hint)
    d = diag.clamp_min(0)
    tol = 1 + 1e-6
    if bool((xs.pow(2) > tol * lm.count * d + 1e-300).any()):
        raise InputError(f"layer '{name}' in {where}: x_sum and xxT are inconsistent "
                         f"(x_sum_i^2 > count * xxT_ii with count {lm.count})", hint=hint)
    eye = torch.eye(xxT.shape[-1], dtype=torch.float64, device=xxT.device)
    jitter = PSD_JITTER * d.sum(-1).clamp_min(1e-300)
    _, info = torch.linalg.cholesky_ex(xxT + jitter[:, None, None] * eye)
    if bool((info != 0).any()):
        raise InputError(f"layer '{name}' in {where}: xxT is not positive semidefinite", hint=hint)


@dataclass
class StoreInfo:
    """File-level attributes of a store."""

    layers: list[list]
    num_images: int
    transform: dict
    seed: int | None = None
    sources: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    ddtd_version: str = __version__
    format_version: int = STORE_FORMAT

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.layers)


def first_difference(store_layers: list[list], model_layers_: list[list]) -> str:
    """Describe the first layer where two layer lists differ."""
    for i in range(max(len(store_layers), len(model_layers_))):
        a = store_layers[i] if i < len(store_layers) else None
        b = model_layers_[i] if i < len(model_layers_) else None
        if a != b:
            if a is None:
                return f"layer '{b[0]}' ({b[1]} {tuple(b[2])}) is in the model but not in the store"
            if b is None:
                return f"layer '{a[0]}' ({a[1]} {tuple(a[2])}) is in the store but not in the model"
            if a[0] != b[0]:
                return f"layer #{i} is '{a[0]}' in the store but '{b[0]}' in the model"
            return (f"layer '{a[0]}' is {a[1]} {tuple(a[2])} in the store but "
                    f"{b[1]} {tuple(b[2])} in the model")
    return "no layer differs"


class CovarianceStore:
    """Read access to a store; layers are loaded on demand.

    Example::

        store = CovarianceStore("calib.h5")
        store.check_model(model)                 # StoreMismatchError if it is not this model's
        sigma = store["layer1.0.conv1"].covariance()   # (g, D, D) float64
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"covariance store '{self.path}' not found",
                             hint="create it with `ddtd calibrate --model ... --images DIR -o FILE.h5`")
        try:
            with h5py.File(self.path, "r") as f:
                a = f.attrs
                if "fingerprint" not in a or "layers" not in a:
                    raise InputError(f"'{self.path}' is an HDF5 file but not a ddtd covariance store",
                                     hint="pass a file written by `ddtd calibrate`")
                self.info = StoreInfo(
                    layers=json.loads(a["layers"]),
                    num_images=int(a["num_images"]),
                    transform=json.loads(a["transform"]),
                    seed=None if int(a["seed"]) < 0 else int(a["seed"]),
                    sources=json.loads(a["sources"]),
                    skipped=json.loads(a["skipped"]),
                    ddtd_version=str(a["ddtd_version"]),
                    format_version=int(a["format_version"]),
                )
                self.names = [_unkey(k) for k in f["layers"].keys()] if "layers" in f else []
        except OSError as exc:
            raise InputError(f"cannot read '{self.path}' as HDF5 ({exc})",
                             hint="the file is damaged or not a store; re-run `ddtd calibrate`") from exc
        except (KeyError, ValueError, TypeError) as exc:  # missing / unparsable attributes
            raise InputError(f"the metadata of store '{self.path}' is damaged ({type(exc).__name__}: {exc})",
                             hint="re-run `ddtd calibrate` to write a new store") from exc
        if not (isinstance(self.info.layers, list) and isinstance(self.info.sources, list)
                and isinstance(self.info.skipped, dict) and self.info.num_images >= 0):
            raise InputError(f"the metadata of store '{self.path}' is damaged (layers / sources / skipped)",
                             hint="re-run `ddtd calibrate` to write a new store")
        if self.info.format_version > STORE_FORMAT:
            raise InputError(f"store format {self.info.format_version} is newer than this ddtd reads",
                             hint="upgrade ddtd")
        order = {layer[0]: i for i, layer in enumerate(self.info.layers)}
        self.names.sort(key=lambda n: order.get(n, len(order)))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> LayerMoments:
        if name not in self.names:
            reason = self.info.skipped.get(name)
            raise InputError(
                f"layer '{name}' is not in the store '{self.path}'"
                + (f" (skipped at calibration: {reason})" if reason else ""),
                hint="re-run `ddtd calibrate` with --layers covering it (and a larger --max-dim "
                "if it was skipped), or leave the layer out with --layers",
            )
        where = f"store '{self.path}'"
        try:
            with h5py.File(self.path, "r") as f:
                g = f["layers"][_key(name)]
                meta = {k: _attr(v) for k, v in g.attrs.items() if k != "sha256"}
                data = {}
                for ds in ("xxT", "x_sum", "count"):
                    arr = g[ds][()]
                    want = g[ds].attrs.get("sha256")
                    if want is not None and _attr(want) != _checksum(np.asarray(arr)):
                        raise InputError(f"layer '{name}' in {where}: dataset '{ds}' fails its checksum "
                                         "(the file was changed after ddtd wrote it)",
                                         hint="re-run `ddtd calibrate`, or restore the store from a copy")
                    data[ds] = arr
        except (KeyError, OSError, ValueError) as exc:
            raise InputError(f"layer '{name}' in {where} cannot be read ({type(exc).__name__}: {exc})",
                             hint="the store is damaged: re-run `ddtd calibrate`") from exc
        lm = LayerMoments(
            xxT=torch.from_numpy(np.asarray(data["xxT"], dtype=np.float64)),
            x_sum=torch.from_numpy(np.asarray(data["x_sum"], dtype=np.float64)),
            count=int(data["count"]),
            meta=meta,
        )
        validate_moments(name, lm, where)
        return lm

    def items(self):
        for name in self.names:
            yield name, self[name]

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`StoreMismatchError` unless the store was made for this architecture."""
        layers = model_layers(model)
        if fingerprint(layers) != self.info.fingerprint:
            raise StoreMismatchError(
                f"the store '{self.path}' was made for another model: "
                + first_difference(self.info.layers, layers),
                hint="calibrate this model with `ddtd calibrate` (or pass the store made for it)",
            )


def _attr(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, bytes):
        return v.decode()
    return v


def write_store(path: str | os.PathLike, moments, info: StoreInfo) -> Path:
    """Write ``moments`` and ``info`` to ``path`` atomically (nothing appears there on failure).

    ``moments`` is a dict or an iterable of ``(name, LayerMoments)`` pairs; an iterable is
    written one layer at a time, so merging large stores holds one layer in memory.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["ddtd_version"] = info.ddtd_version
            f.attrs["format_version"] = STORE_FORMAT
            f.attrs["fingerprint"] = info.fingerprint
            f.attrs["layers"] = json.dumps(info.layers)
            f.attrs["num_images"] = int(info.num_images)
            f.attrs["transform"] = json.dumps(info.transform)
            f.attrs["seed"] = -1 if info.seed is None else int(info.seed)
            f.attrs["sources"] = json.dumps(info.sources)
            f.attrs["skipped"] = json.dumps(info.skipped)
            root = f.create_group("layers")
            for name, lm in (moments.items() if isinstance(moments, dict) else moments):
                check_interrupt()
                g = root.create_group(_key(name))
                for ds, arr in (("xxT", lm.xxT.detach().cpu().to(torch.float64).numpy()),
                                ("x_sum", lm.x_sum.detach().cpu().to(torch.float64).numpy()),
                                ("count", np.int64(lm.count))):
                    g.create_dataset(ds, data=arr).attrs["sha256"] = _checksum(np.asarray(arr))
                for k, v in lm.meta.items():
                    g.attrs[k] = v
    return path


def _check_compatible(a: CovarianceStore, b: CovarianceStore) -> None:
    if a.info.fingerprint != b.info.fingerprint:
        raise StoreMismatchError(
            f"'{a.path}' and '{b.path}' were made for different models: "
            + first_difference(a.info.layers, b.info.layers),
            hint="only stores of the same architecture can be merged",
        )
    if a.info.transform != b.info.transform:
        raise StoreMismatchError(
            f"'{a.path}' and '{b.path}' used different image transforms "
            f"({a.info.transform} vs {b.info.transform})",
            hint="calibrate both with the same --size/--resize/--mean/--std",
        )
    if set(a.names) != set(b.names):
        diff = sorted(set(a.names) ^ set(b.names))
        raise StoreMismatchError(
            f"'{a.path}' and '{b.path}' hold different layers (e.g. '{diff[0]}')",
            hint="calibrate both with the same --layers and --max-dim",
        )


def merge_stores(paths: list[str | os.PathLike], out: str | os.PathLike) -> StoreInfo:
    """Add up several stores of the same model into ``out`` (written atomically)."""
    if len(paths) < 1:
        raise InputError("nothing to merge", hint="pass two or more store files")
    stores = [CovarianceStore(p) for p in paths]
    for other in stores[1:]:
        _check_compatible(stores[0], other)
    seen: dict[str, Path] = {}
    for s in stores:
        for src in s.info.sources:
            sid = src.get("id") if isinstance(src, dict) else None
            if sid is not None and sid in seen:
                raise InputError(
                    f"'{s.path}' and '{seen[sid]}' hold the same calibration run (source id {sid[:8]}); merging "
                    "would count its images twice",
                    hint="merge stores of different runs only (ddtd info shows each store's sources)")
            if sid is not None:
                seen[sid] = s.path
    resolved = [s.path.resolve() for s in stores]
    if len(set(resolved)) != len(resolved):
        raise InputError("the same store is given twice; merging would count its images twice",
                         hint="pass each store once")
    first = stores[0]

    def summed():
        for name in first.names:
            acc = first[name]
            for other in stores[1:]:
                acc = acc.add(other[name])
            yield name, acc

    info = StoreInfo(
        layers=first.info.layers,
        num_images=sum(s.info.num_images for s in stores),
        transform=first.info.transform,
        seed=first.info.seed if all(s.info.seed == first.info.seed for s in stores) else None,
        sources=[src for s in stores for src in s.info.sources],
        skipped={k: v for s in stores for k, v in s.info.skipped.items()},
    )
    write_store(out, summed(), info)
    return info
