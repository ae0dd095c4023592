"""What a compression reports: the per-layer table and totals (:class:`Report`), the result of
:func:`ddtd.compress` (:class:`CompressResult`), and their text / JSON forms and a plot of
accuracy against compression ratio."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_path
from .errors import InputError
from .solvers import NORM_GROWTH_WARN, norm_growth_warning

__all__ = ["LayerReport", "Report", "CompressResult", "format_report", "growth_warnings", "write_json",
           "plot_accuracy"]


@dataclass
class LayerReport:
    """One row of the table: what became of one layer (``method`` ``"dense"`` when it was kept,
    ``note`` says why), its sizes before / after, its errors and fitting time."""

    name: str
    type: str
    method: str
    ranks: Any
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    sigma_error: float | None
    weight_error: float | None
    seconds: float
    note: str = ""
    info: dict = field(default_factory=dict)  # method extras: sensitivity before / after, nnz, bytes


@dataclass
class Report:
    """Per-layer table and totals of a compression (JSON-serialisable with :meth:`to_dict`)."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    fidelity: dict = field(default_factory=dict)  # held-out agreement / error, target, probe curve

    @property
    def ratio(self) -> float:
        return self.params_before / max(1, self.params_after)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(1, self.macs_after)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"], d["macs_ratio"] = self.ratio, self.macs_ratio
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        d = {k: v for k, v in d.items() if k not in ("ratio", "macs_ratio")}
        d["layers"] = [LayerReport(**row) for row in d.get("layers", [])]
        return cls(**d)


@dataclass
class CompressResult:
    """The compressed model (plain PyTorch), its :class:`Report` and the replacement records
    that :func:`ddtd.model_io.load_model` replays on a fresh architecture."""

    model: nn.Module
    report: Report
    records: list[dict]




def _fmt_ranks(r) -> str:
    if r is None:
        return "-"
    return "x".join(str(v) for v in r) if isinstance(r, (list, tuple)) else str(r)


def _shown_ranks(r):
    """lrs / sparse rows show ``rank+nnz`` (their plan entry is a byte budget)."""
    info = getattr(r, "info", None) or {}
    if "nnz" in info:
        return f"r{_fmt_ranks(info.get('rank'))}+{info['nnz']}nz"
    return r.ranks


def _sensitivity(r) -> str:
    """CP rows: sensitivity of the (balanced) CP-ALS factors -> of the returned ones."""
    info = getattr(r, "info", None) or {}
    if "sensitivity_after" not in info:
        return "-"
    b, a = info.get("sensitivity_before"), info["sensitivity_after"]
    return f"{b:.3g}->{a:.3g}" if b is not None and b != a else f"{a:.3g}"


def _norm_ratio(r) -> str:
    """``||W~||_F / ||W||_F`` of the solver's fit (``info['norm_ratio']``), ``!`` appended above
    :data:`ddtd.solvers.NORM_GROWTH_WARN`; ``-`` where the row has none."""
    ratio = (getattr(r, "info", None) or {}).get("norm_ratio")
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + ("!" if ratio > NORM_GROWTH_WARN else "")


def growth_warnings(report: Report, threshold: float = NORM_GROWTH_WARN) -> list[str]:
    """One :func:`ddtd.solvers.norm_growth_warning` message per layer whose fitted weights grew
    beyond ``threshold`` times the original's Frobenius norm."""
    out = []
    for r in report.layers:
        msg = norm_growth_warning(getattr(r, "info", None) or {}, r.name, threshold)
        if msg:
            out.append(msg)
    return out


def _num(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def format_report(report: Report) -> str:
    """Per-layer table (method, ranks, parameters and multiply-adds before / after, Sigma and
    weight errors, the fit's norm ratio ``||W~||_F / ||W||_F`` flagged with ``!`` above
    :data:`ddtd.solvers.NORM_GROWTH_WARN`, CP sensitivity before / after) and totals, then one
    warning line per flagged layer.  Parameters of low-rank + sparse layers count their int32
    indices too (one 4-byte unit each)."""
    rows = [("layer", "type", "method", "ranks", "params", "-> after", "MACs", "-> after",
             "Sigma err", "weight err", "|W~|/|W|", "sensitivity", "note")]
    for r in report.layers:
        rows.append((r.name, r.type, r.method, _fmt_ranks(_shown_ranks(r)), _num(r.params_before),
                     _num(r.params_after), _num(r.macs_before), _num(r.macs_after),
                     "-" if r.sigma_error is None else f"{r.sigma_error:.4f}",
                     "-" if r.weight_error is None else f"{r.weight_error:.4f}", _norm_ratio(r),
                     _sensitivity(r), r.note))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    s = report.settings
    lines.append("")
    lines.append(
        f"total: {_num(report.params_before)} -> {_num(report.params_after)} parameters "
        f"({report.ratio:.2f}x), {_num(report.macs_before)} -> {_num(report.macs_after)} multiply-adds "
        f"({report.macs_ratio:.2f}x); method {s.get('method')}, norm {s.get('norm')}, "
        f"strategy {s.get('strategy')}, sequential {s.get('sequential')}"
    )
    if s.get("layers_ratio"):
        lines.append(f"compressible layers alone: {s['layers_ratio']:.2f}x (the ratio asked was of the "
                     f"{'layers alone' if s.get('scope') == 'layers' else 'whole model'})")
    if isinstance(s.get("stages"), list):
        lines.append("stages: " + ", ".join(f"{st['reached']:.2f}x" for st in s["stages"]))
    if report.seconds:
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()))
    lines.extend("warning: " + msg for msg in growth_warnings(report))
    return "\n".join(lines)


def write_json(obj: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=str))


def plot_accuracy(results: list[dict], path: str | os.PathLike) -> None:
    """Accuracy against compression ratio, one line per (method, norm); ``results`` are the
    JSON objects written by ``ddtd eval --json``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("plotting needs matplotlib", hint="pip install 'ddtd[plot]'") from exc
    series: dict[str, list] = {}
    for r in results:
        if r.get("accuracy") is None or r.get("ratio") is None:
            continue
        key = f"{r.get('method', '?')} / {r.get('norm', '?')}"
        series.setdefault(key, []).append((r["ratio"], r["accuracy"]))
    if not series:
        raise InputError("no result has both a ratio and an accuracy",
                         hint="give JSON files written by `ddtd eval --json` on labelled images")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=key)
    base = [r["reference_accuracy"] for r in results if r.get("reference_accuracy") is not None]
    if base:
        ax.axhline(100 * base[0], color="gray", linestyle="--", label="original")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio (parameters)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
