"""The results table: methods x norms x ratios on the reference models, no fine-tuning.

    python benchmarks/table.py                       # everything (long: run in the background)
    python benchmarks/table.py --models resnet18 --methods svd tucker2 --ratios 2 4
    python benchmarks/table.py --render              # only rebuild the Markdown table and plot

For every (model, method, norm, ratio): top-1 accuracy on the full Fashion-MNIST test set (10k
images), parameters, multiply-adds, CPU latency (batch 1 and 32, median, measured in alternating
rounds against the dense model with BatchNorm folded, so the speedup is the factorisation's own)
and compression time (calibration on the 512-image subset included). Rows are appended to
benchmarks/results/table.jsonl as they finish (a re-run skips rows already there), then rendered
to benchmarks/results/table.md and benchmarks/results/table.png.

Method names are those of ``ddtd compress --method`` plus variants for the low-rank + sparse
comparison: ``lrs-residual`` / ``lrs-masked`` are the seed's initialisations alone (eq. 12 /
13-14, no data-driven rounds), ``lrs-s50`` a fixed split (half the bytes to the sparse part);
``sparse`` with ``--norms frobenius`` is magnitude pruning; a ``-d0`` suffix (``cp3-d0``,
``cp3-stable-d0``) fits without ddtd's Sigma damping, like the seed's CP-ALS; ``cp3-stable-refit``
is stable CP with ``finish="refit"`` (least-squares output factor). ``--quantize`` also measures the
accuracy with the replaced layers' factor weights rounded to float16 and to 8 bits per output
channel (symmetric, one scale per output channel of every factor conv / linear), the rest of
the model in float32: the robustness test of stable CP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "examples"))


def test_set():
    from ddtd.data import preprocess
    from ddtd.datasets import load_fashion_mnist
    from train_reference import TRANSFORM

    x, y = load_fashion_mnist("test")
    return torch.cat([preprocess(x[i : i + 2000], TRANSFORM) for i in range(0, len(x), 2000)]), y


@torch.no_grad()
def _logits(model, x, batch=500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def accuracy(model, x, y, batch=500) -> float:
    return int((_logits(model, x, batch).argmax(1) == y).sum()) / len(x)


def _seq_label(value, norm: str = "sigma") -> str:
    """Rows store the mode the pipeline used: 'auto' / 'on' / 'off' (older rows: a bool)."""
    if value is None or value == "auto":
        return "auto" if norm == "sigma" else "off"  # the Frobenius baseline uses no data
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def method_config(method: str, max_iter: int):
    """The method config of a table method name (see the module docstring)."""
    from dataclasses import replace

    from ddtd.methods import LRSConfig, default_config, with_settings

    if method.endswith("-refit"):  # stable CP with the least-squares output factor: cp3-stable-refit
        return replace(with_settings(default_config(method[: -len("-refit")]), max_iter=max_iter), finish="refit")
    if method.endswith("-d0"):  # undamped Sigma (the seed's CP-ALS): e.g. cp3-d0, cp3-stable-d0
        return with_settings(default_config(method[:-3]), max_iter=max_iter, damping=0.0)
    if method == "auto-full":  # every candidate fitted in full before choosing
        return replace(with_settings(default_config("auto"), max_iter=max_iter), probe_iters=None)
    if method.startswith("lrs-"):
        variant = method[4:]
        if variant in ("residual", "masked"):
            return LRSConfig(init=variant, iters=0, sparsity=0.5)
        if variant.startswith("s") and variant[1:].isdigit():
            return LRSConfig(sparsity=int(variant[1:]) / 100)
        raise SystemExit(f"unknown lrs variant {method!r}")
    return with_settings(default_config(method), max_iter=max_iter)


def _replaced_weights(model, report):
    """Weights of the factor layers that replaced dense ones (Conv2d / Linear / sparse values)."""
    from ddtd.layers import get_module

    for row in report.layers:
        if row.method == "dense":
            continue
        for sub in get_module(model, row.name).modules():
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
                yield sub.weight


@torch.no_grad()
def quantized_accuracies(model, report, xt, yt, bits=(8,)) -> dict:
    """Accuracy with the replaced layers' factor weights in float16 and in ``int<b>`` per output
    channel for each ``b`` in ``bits`` (symmetric, one scale per output channel: ``2^(b-1) - 1``
    levels each side), and two measures of what the rounding did that do not cancel out: the
    fraction of test images whose predicted class changed (``<kind>_flips``, against the float32
    model's predictions; of them ``<kind>_broke`` went right -> wrong, ``<kind>_fixed`` wrong ->
    right) and the relative change of the logits ``||z_q - z|| / ||z||`` (``<kind>_logit_error``)."""
    import copy

    z = _logits(model, xt)
    out = {}
    for kind in ["float16"] + [f"int{b}" for b in bits]:
        q = copy.deepcopy(model)
        for w in _replaced_weights(q, report):
            if kind == "float16":
                w.copy_(w.half().float())
            else:
                levels = 2 ** (int(kind[3:]) - 1) - 1
                flat = w.reshape(w.shape[0], -1)
                scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-30) / levels
                w.copy_((torch.round(flat / scale).clamp(-levels, levels) * scale).reshape(w.shape))
        zq = _logits(q, xt)
        out[kind] = int((zq.argmax(1) == yt).sum()) / len(xt)
        out[f"{kind}_flips"] = int((zq.argmax(1) != z.argmax(1)).sum()) / len(xt)
        right, right_q = z.argmax(1) == yt, zq.argmax(1) == yt
        out[f"{kind}_broke"] = int((right & ~right_q).sum()) / len(xt)  # right -> wrong
        out[f"{kind}_fixed"] = int((~right & right_q).sum()) / len(xt)  # wrong -> right
        out[f"{kind}_logit_error"] = float((zq - z).norm() / z.norm())
    return out


def calibration_subset() -> Path:
    """The 512-image Fashion-MNIST training subset every benchmark calibrates on (built once)."""
    calib = ROOT / "calib" / "fmnist-512"
    if not calib.exists():
        sys.path.insert(0, str(ROOT / "calib"))
        from make_subset import build

        build("fashion-mnist", calib, 512, 0, "train")
    return calib


def sensitivity_totals(report) -> dict | None:
    """Summed CP sensitivity ``{"before", "after"}`` over the report's CP layers (``None``: none)."""
    stab = [r.info for r in report.layers if "sensitivity_after" in r.info]
    if not stab:
        return None
    return {"before": sum(i["sensitivity_before"] for i in stab), "after": sum(i["sensitivity_after"] for i in stab)}


def run(args) -> None:
    from ddtd.config import CalibrationConfig, CompressConfig, Size
    from ddtd.evaluate import paired_latency
    from ddtd.pipeline import compress, prepare
    from ddtd.model_io import load_model
    from train_reference import TRANSFORM, ensure

    RESULTS.mkdir(exist_ok=True)
    out = Path(args.results)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            done.add(_row_key(json.loads(line)))
    calib = calibration_subset()
    xt, yt = test_set()
    for name in args.models:
        info = ensure(name)
        model = load_model(info["model"])
        folded, _ = prepare(model)
        base_acc = accuracy(model, xt, yt)
        shape = (3, 32, 32)
        for method in args.methods:
            for norm in args.norms:
                for ratio in args.ratios:
                    for seq in args.sequential:
                        key = (name, method, norm, ratio, _seq_label(seq, norm), args.strategy, args.stages)
                        if key in done and not args.redo:
                            continue
                        config = CompressConfig(
                            method=method_config(method, args.max_iter), norm=norm, sequential=seq, stages=args.stages,
                            size=Size(ratio=ratio, strategy=args.strategy),
                            calibration=CalibrationConfig(transform=TRANSFORM, batch_size=128, show_progress=False))
                        t = time.time()
                        try:
                            res = compress(model, str(calib), config)
                        except Exception as exc:  # record failures instead of losing the run
                            row = {"model": name, "method": method, "norm": norm, "ratio_target": ratio,
                                   "sequential": seq, "error": f"{type(exc).__name__}: {exc}"}
                            print(json.dumps(row), flush=True)
                            with open(out, "a") as f:
                                f.write(json.dumps(row) + "\n")
                            continue
                        seconds = time.time() - t
                        acc = accuracy(res.model, xt, yt)
                        lat = paired_latency({"dense": folded, "compressed": res.model}, shape,
                                             rounds=args.latency_rounds)
                        row = {
                            "model": name, "method": method, "norm": norm, "ratio_target": ratio,
                            "sequential": res.report.settings["sequential"], "base_accuracy": base_acc,
                            "sequential_layers": sum(1 for l in res.report.layers if l.note == "sequential"),
                            "accuracy": acc, "ratio": res.report.ratio, "macs_ratio": res.report.macs_ratio,
                            "params": res.report.params_after, "params_before": res.report.params_before,
                            "macs": res.report.macs_after, "macs_before": res.report.macs_before,
                            "latency_ms": lat["compressed"], "dense_latency_ms": lat["dense"],
                            "seconds": seconds, "threads": torch.get_num_threads(),
                            "bytes": 4 * res.report.params_after, "strategy": args.strategy, "stages": args.stages,
                        }
                        if args.quantize:
                            row["quantized_accuracy"] = quantized_accuracies(res.model, res.report, xt, yt)
                        if (ss := sensitivity_totals(res.report)) is not None:
                            row["sensitivity"] = ss
                        print(json.dumps(row), flush=True)
                        _store_row(out, row, key if key in done else None)


def _row_key(r: dict) -> tuple:
    return (r["model"], r["method"], r["norm"], r["ratio_target"], _seq_label(r.get("sequential"), r["norm"]),
            r.get("strategy", "global"), r.get("stages", 1))


def _store_row(out: Path, row: dict, replaces: tuple | None, key=None) -> None:
    """Append ``row`` to the results file (one short write, so runs for different models may share
    it); with ``replaces`` (``--redo``), drop the older rows whose ``key(row)`` (default
    :func:`_row_key`) equals it first (rewritten atomically)."""
    if replaces is None:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    key = key or _row_key
    kept = [line for line in out.read_text().splitlines() if key(json.loads(line)) != replaces]
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("\n".join(kept + [json.dumps(row)]) + "\n")
    os.replace(tmp, out)


def render() -> None:
    rows = [json.loads(line) for line in (RESULTS / "table.jsonl").read_text().splitlines()]
    lines = []
    for name in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == name and "accuracy" in r]
        if not rs:
            continue
        base = rs[0]["base_accuracy"]
        lines += [f"**{name}** (Fashion-MNIST test accuracy {100 * base:.2f}%, "
                  f"{rs[0]['params_before'] / 1e6:.2f}M parameters, {rs[0]['macs_before'] / 1e6:.1f}M multiply-adds, BN folded)", "",
                  "| method | norm | seq | target | params ratio | MACs ratio | top-1 | drop | latency b1 / b32 ms (dense) | speedup b1 / b32 | time s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["method"], r["norm"], r["ratio_target"], _seq_label(r["sequential"]),
                                           r.get("stages", 1))):
            lat, dl = r["latency_ms"], r["dense_latency_ms"]
            seq = _seq_label(r["sequential"])
            if seq == "auto":
                seq += f" ({r.get('sequential_layers', '?')} seq)"
            meth = r["method"] + (" (uniform)" if r.get("strategy") == "uniform" else "") + (
                f" ({r['stages']} stages)" if r.get("stages", 1) > 1 else "")
            lines.append(
                f"| {meth} | {r['norm']} | {seq} | {r['ratio_target']:g}x | "
                f"{r['ratio']:.2f}x | {r['macs_ratio']:.2f}x | {100 * r['accuracy']:.2f}% | "
                f"{100 * (base - r['accuracy']):+.2f} | {lat['batch1']:.2f} / {lat['batch32']:.1f} "
                f"({dl['batch1']:.2f} / {dl['batch32']:.1f}) | {dl['batch1'] / lat['batch1']:.2f}x / "
                f"{dl['batch32'] / lat['batch32']:.2f}x | {r['seconds']:.0f} |")
        qs = [r for r in rs if "quantized_accuracy" in r]
        if qs:
            lines += ["", "Factor precision (same compressed models; loss against each row's own float32 accuracy):", "",
                      "| method | norm | target | float32 | float16 | int8 / out. channel | int8 loss | "
                      "int8 prediction flips | int8 logit error | sensitivity (sum over layers) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in sorted(qs, key=lambda r: (r["ratio_target"], r["method"], r["norm"])):
                qa, ss = r["quantized_accuracy"], r.get("sensitivity")
                flips = f"{100 * qa['int8_flips']:.2f}%" if "int8_flips" in qa else "-"
                lerr = f"{qa['int8_logit_error']:.2e}" if "int8_logit_error" in qa else "-"
                lines.append(
                    f"| {r['method']} | {r['norm']} | {r['ratio_target']:g}x | {100 * r['accuracy']:.2f}% | "
                    f"{100 * qa['float16']:.2f}% | {100 * qa['int8']:.2f}% | "
                    f"{100 * (r['accuracy'] - qa['int8']):+.2f} | {flips} | {lerr} | "
                    + (f"{ss['before']:.3g} -> {ss['after']:.3g}" if ss else "-") + " |")
        failed = [r for r in rows if r["model"] == name and "error" in r]
        for r in failed:
            lines.append(f"| {r['method']} | {r['norm']} | - | {r['ratio_target']:g}x | failed: {r['error'][:80]} |")
        lines.append("")
    (RESULTS / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    models = sorted({r["model"] for r in rows if "accuracy" in r})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == name and "accuracy" in r]
        keyf = lambda r: (r["method"], r["norm"], _seq_label(r["sequential"]))  # noqa: E731
        for key in sorted({keyf(r) for r in rs}):
            pts = sorted((r["ratio"], 100 * r["accuracy"]) for r in rs if keyf(r) == key)
            style = "-" if key[1] == "sigma" else "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                    label=f"{key[0]} {key[1]}" + ("" if key[2] == "off" else f" seq {key[2]}"))
        ax.axhline(100 * rs[0]["base_accuracy"], color="gray", linestyle=":", label="original")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (parameters)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{name}, Fashion-MNIST, no fine-tuning")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "table.png", dpi=110)
    print(f"wrote {RESULTS / 'table.png'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg"],
                    help="reference models of examples/train_reference.py (resnet18, vgg, mobilenet_v3_small, vit)")
    ap.add_argument("--methods", nargs="+", default=["svd", "tucker2", "cp3", "cp4", "auto"])
    ap.add_argument("--norms", nargs="+", default=["frobenius", "sigma"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[2, 4, 8, 16])
    ap.add_argument("--sequential", nargs="+", default=["auto"], choices=["auto", "on", "off"])
    ap.add_argument("--max-iter", type=int, default=25)
    ap.add_argument("--results", default=str(RESULTS / "table.jsonl"),
                    help="rows file (default benchmarks/results/table.jsonl; --render reads that one)")
    ap.add_argument("--stages", type=int, default=1, help="compress in this many recalibrated stages (ddtd --stages)")
    ap.add_argument("--latency-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--strategy", choices=["global", "uniform"], default="global",
                    help="rank allocation (uniform: every layer at the same ratio, i.e. equal bytes per layer)")
    ap.add_argument("--quantize", action="store_true",
                    help="also measure accuracy with factors in float16 and int8 per output channel")
    ap.add_argument("--render", action="store_true", help="only render the table and plot")
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the results file (replacing them)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.render:
        run(args)
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
