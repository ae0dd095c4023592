"""Calibration throughput against plain inference, side by side in one run.

    python benchmarks/calibrate.py             # resnet18 @224 (random weights) + reference ResNet @32
    python benchmarks/calibrate.py --quick     # fewer images, one process per model
    python benchmarks/calibrate.py --compare   # also the lag-only method and naive unfolding

For each model: images per second of plain inference and of calibration (forward + moment
hooks) on the same preloaded images, each at its best batch size of those tried (calibration
amortises its per-batch float64 accumulation over larger batches), and their ratio (target:
<= 3x) for the default moment algorithm (``conv_method="auto"``: fast Toom-Cook lag correlations
where they are cheaper, gathered patches for 1x1 / strided convs, whole-input moments on tiny
maps); the ratios at equal batch sizes; peak memory (max RSS of the process) and the size of the
HDF5 store. Within a process, timings alternate inference and calibration and report medians.

On a shared 2-core machine a single process's ratio moved by about 25% from one process to the
next (almost all of it in the inference time, e.g. 61-76 img/s at 224 px), so each model is
measured in ``--processes`` fresh processes (default 3, run alternately across the models) and
the median ratio is reported with the range. ``--compare`` adds the lag-only method
(``"auto-direct"``: one GEMM per lag; the "previous lag method" column) and the naive
unfold-then-X^T X reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_name: str, num_images: int, batch_sizes: tuple[int, ...], repeats: int,
            compare: bool = False) -> dict:
    from ddtd.calibration import MomentCollector, save_calibration
    from ddtd.calibration.run import calibrate
    from ddtd.config import CalibrationConfig
    from ddtd.model_io import load_model

    torch.manual_seed(0)
    note = "random weights"
    if model_name == "resnet18@224":
        model, size = load_model("resnet18"), 224
    else:
        cache = Path(os.environ.get("DDTD_CACHE", Path.home() / ".cache" / "ddtd")) / "reference"
        path = cache / "resnet18_fmnist.ddtd"
        if path.exists():
            model, note = load_model(path), f"trained ({path})"
        else:
            model = load_model("resnet18", num_classes=10)
        size = 32
    model.eval()
    images = torch.randn(num_images, 3, size, size)
    rss0 = _peak_rss_mib()

    def infer(batches):
        def run():
            with torch.no_grad():
                for b in batches:
                    model(b)
        return run

    def calib(batches, method):
        def run():
            with torch.no_grad(), MomentCollector(model, conv_method=method):
                for b in batches:
                    model(b)
        return run

    # Each kind at every batch size, alternating; the best (median) throughput of each counts.
    per_batch = {}
    for bs in batch_sizes:
        batches = list(images.split(bs))
        kinds = [infer(batches), calib(batches, "auto")] + ([calib(batches, "auto-direct")] if compare else [])
        for fn in kinds:  # warm-up
            fn()
        times = [[] for _ in kinds]
        for r in range(repeats):
            for fn, acc in zip(kinds, times):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
        per_batch[bs] = [statistics.median(ts) for ts in times]
    inf_bs = min(per_batch, key=lambda b: per_batch[b][0])
    cal_bs = min(per_batch, key=lambda b: per_batch[b][1])
    inf, cal = per_batch[inf_bs][0], per_batch[cal_bs][1]
    extra = {}
    if compare:
        old_bs = min(per_batch, key=lambda b: per_batch[b][2])
        t = time.perf_counter()
        calib(list(images.split(cal_bs)), "unfold")()
        extra = {"old_batch": old_bs, "old_ratio": per_batch[old_bs][2] / inf,
                 "naive_unfold_ratio": (time.perf_counter() - t) / inf}
    result = calibrate(model, images, CalibrationConfig(batch_size=cal_bs, show_progress=False))
    with tempfile.TemporaryDirectory() as d:
        p = save_calibration(result, Path(d) / "s.h5")
        store_mib = p.stat().st_size / 2**20
    return {
        "model": model_name,
        "weights": note,
        "images": num_images,
        "infer_batch": inf_bs,
        "calib_batch": cal_bs,
        "same_batch_ratios": {bs: v[1] / v[0] for bs, v in per_batch.items()},
        "infer_img_s": num_images / inf,
        "calib_img_s": num_images / cal,
        "ratio": cal / inf,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_mib": rss0,
        "store_mib": store_mib,
        "layers": len(result.moments),
        "threads": torch.get_num_threads(),
        **extra,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--processes", type=int, default=None,
                    help="fresh processes per model (default 3, 1 with --quick); the median ratio counts")
    ap.add_argument("--compare", action="store_true",
                    help="also time the lag-only method (auto-direct) and naive unfolding (slow)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model in this process
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {
        # 512 images: the size of the demo's calibration subset (a pass over only 128 images
        # read about 0.6x higher, one-time costs such as first-touch buffer pages included).
        "resnet18@224": (128 if args.quick else 512, (16, 32), 2 if args.quick else 3),
        "reference-resnet18@32": (512 if args.quick else 2048, (128, 512), 2 if args.quick else 3),
    }
    if args.one:
        print(json.dumps(measure(args.one, *configs[args.one], compare=args.compare)))
        return 0
    processes = args.processes or (1 if args.quick else 3)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(processes):
        for name in configs:  # alternately, so that a slow spell of the machine hits both models
            cmd = [sys.executable, __file__, "--one", name] + (["--quick"] if args.quick else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--compare"] if args.compare else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, {processes} process(es) per model")
    hdr = ["model", "weights", "images", "calib/infer (median)", "per process", "infer img/s (batch)",
           "calib img/s (batch)", "same-batch ratios", "peak RSS MiB", "store MiB"]
    if args.compare:
        hdr += ["previous lag method/infer (batch)", "naive unfold/infer"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for name, rs in runs.items():
        ratios = [r["ratio"] for r in rs]
        med = sorted(rs, key=lambda r: r["ratio"])[(len(rs) - 1) // 2]  # the process with the median ratio
        same = ", ".join(f"{v:.2f}x @{k}" for k, v in med["same_batch_ratios"].items())
        cells = [name, med["weights"].split(" (")[0], str(med["images"]), f"{statistics.median(ratios):.2f}x",
                 " / ".join(f"{x:.2f}x" for x in ratios),
                 f"{med['infer_img_s']:.1f} ({med['infer_batch']})", f"{med['calib_img_s']:.1f} ({med['calib_batch']})",
                 same, f"{max(r['peak_rss_mib'] for r in rs):.0f}", f"{med['store_mib']:.1f}"]
        if args.compare:
            cells += [" / ".join(f"{r['old_ratio']:.2f}x" for r in rs) + f" ({med['old_batch']})",
                      " / ".join(f"{r['naive_unfold_ratio']:.2f}x" for r in rs)]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
