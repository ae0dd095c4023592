"""Calibration and solver timings on a GPU against the CPU, side by side in one run.

    python benchmarks/gpu_timing.py --device cuda --out benchmarks/results/gpu_check.txt
    python benchmarks/gpu_timing.py --device cpu --quick        # no GPU: the CPU column only

Part of ``benchmarks/gpu_check.sh``. Three tables:

1. **Calibration**: torchvision ResNet-18 and MobileNetV2 (random weights) on natural images
   (random crops and flips of scikit-image's bundled photographs; smoothed noise where
   scikit-image is missing), images per second of plain inference and of ``ddtd.calibrate``
   (every Conv2d / Linear) on each device, the calibration / inference ratio, the GPU / CPU
   speed-up, and the largest relative difference between the two devices' moments (a check that
   the GPU computes the same sums). Batches start on the CPU, as in ``ddtd calibrate``.
2. **Solvers**: every solver on one 256 x 256 x 3 x 3 conv of that ResNet-18 (``layer3.1.conv1``;
   ``--quick``: the 128-channel ``layer2.1.conv1``) with its real centred Sigma from the
   calibration above: seconds per device, speed-up, and each device's relative Sigma error
   (they must agree).
3. **Compress** (a GPU only, skipped with ``--quick``): ``ddtd.compress`` of the ResNet-18 at 2x
   with ``svd`` and default settings on the device (at most 64 photos), wall time and the
   report's stage times.

Calibration figures on the GPU are the median of ``--repeats`` runs after one warm-up run (CUDA
context, cuDNN autotuning), on the CPU one run after a warm-up; every solver runs once per device,
after all of them ran once on a small layer on the GPU (kernel loading, cuSOLVER handles). A section that
fails is reported with its error and the script exits with status 1 after the others ran. The
sizes keep the whole run under about 4 minutes on one H200 with 16 CPU cores; ``--quick`` on
the CPU alone takes a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the synthetic layers of the tests

OUT = io.StringIO()
T0 = time.time()


def save(args) -> None:
    """Write what was logged so far to ``--out`` (after every section: a run stopped from
    outside keeps its finished tables)."""
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(OUT.getvalue())


def over_time(args) -> bool:
    """Whether the run has used its ``--time-limit`` (later sections are then left out)."""
    return args.time_limit is not None and time.time() - T0 > args.time_limit


def log(*a) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    OUT.write(s + "\n")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``repeats`` calls of ``fn`` (synchronised), and the last result."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ------------------------------------------------------------------------------ images

def photos(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 3, size, size)`` ImageNet-normalised random crops / flips of natural photographs."""
    g = torch.Generator().manual_seed(seed)
    srcs = []
    try:
        import numpy as np

        from photos import sources  # benchmarks/photos.py: the photographs available offline

        srcs = [torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1) for a in sources().values()]
    except ImportError:
        pass
    if not srcs:  # smoothed noise: correlated like photos, no package needed
        base = torch.rand(8, 3, 16, 16, generator=g)
        srcs = list(torch.nn.functional.interpolate(base, size=4 * size, mode="bicubic").clamp(0, 1))
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = srcs[i % len(srcs)]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.4 + 0.6 * float(torch.rand((), generator=g))))
        y0 = int(torch.randint(0, h - side + 1, (), generator=g))
        x0 = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, y0:y0 + side, x0:x0 + side][None]
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        out[i] = crop.flip(-1) if float(torch.rand((), generator=g)) < 0.5 else crop
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (out - mean) / std


# ------------------------------------------------------------------------------ calibration

def calibration_table(devices, args, failures):
    """Table 1; returns the ResNet-18 and its moments from the last device (for the solvers),
    or ``(None, {})``."""
    import torchvision

    from ddtd import CalibrationConfig, calibrate

    size, n = (112, 16) if args.quick else (224, args.images)
    x = photos(n, size)
    bs = 16 if args.quick else 32
    log(f"\n## Calibration: {n} photos at {size} px, batches of {bs} (images / s; ratio = calibration time "
        "/ inference time)")
    log("| model | device | infer img/s | calib img/s | calib/infer | GPU speed-up (calib) | max rel. diff of moments |")
    log("|---|---|---|---|---|---|---|")
    keep = (None, {})
    models = {"resnet18": torchvision.models.resnet18, "mobilenet_v2": torchvision.models.mobilenet_v2}
    for name, ctor in models.items():
        if args.quick and name != "resnet18":
            continue
        try:
            torch.manual_seed(0)
            base = ctor().eval()
            results = {}
            for dev in devices:
                model = copy.deepcopy(base).to(dev)
                reps = args.repeats if dev.type == "cuda" else 1

                def infer():
                    with torch.no_grad():
                        for b in x.split(bs):
                            model(b.to(dev))

                cal = CalibrationConfig(batch_size=bs, show_progress=False)

                def calib():
                    return calibrate(model, x, cal, device=dev)

                with torch.no_grad():  # warm-up: context, cuDNN autotuning, moment plans
                    model(x[:bs].to(dev))
                calibrate(model, x[:bs], cal, device=dev)
                t_inf, _ = timed(infer, dev, reps)
                t_cal, res = timed(calib, dev, reps)
                results[dev.type] = (t_inf, t_cal, {k: v.to_cpu() for k, v in res.moments.items()})
                del model, res
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            diff = ""
            if len(results) == 2:
                a, b = results["cpu"][2], results["cuda"][2]
                worst = max(float((b[k].xxT - a[k].xxT).norm() / a[k].xxT.norm().clamp_min(1e-300)) for k in a)
                diff = f"{worst:.1e}"
                if worst > 1e-4:
                    failures.append(f"calibration {name}: GPU moments differ from the CPU's by {worst:.1e}")
            for dev in devices:
                t_inf, t_cal, _ = results[dev.type]
                speed = (f"{results['cpu'][1] / t_cal:.1f}x" if dev.type == "cuda" and "cpu" in results else "")
                log(f"| {name}@{size} | {dev.type} | {n / t_inf:.1f} | {n / t_cal:.1f} | {t_cal / t_inf:.2f}x | "
                    f"{speed} | {diff if dev.type == 'cuda' else ''} |")
            if name == "resnet18":
                keep = (base, results[devices[-1].type][2])
        except Exception as exc:  # reported, the other sections still run
            failures.append(f"calibration {name}: {type(exc).__name__}: {exc}")
            log(f"| {name}@{size} | FAILED: {type(exc).__name__}: {exc} | | | | | |")
            traceback.print_exc()
    return keep


# ------------------------------------------------------------------------------ solvers

def solver_cases(quick: bool, T: int, D: int):
    """name -> call(weight, sigma) for a (T, S, 3, 3) conv."""
    from ddtd import solvers as S

    it = 5 if quick else 10
    r_svd, r_cp = T // 4, T
    nnz = T * D // 20
    return {
        f"sigma_svd r={r_svd}": lambda w, s: S.sigma_svd(w, s, r_svd),
        f"tucker2 ({T // 2},{T // 2}) {it} it": lambda w, s: S.tucker2(w, s, (T // 2, T // 2), max_iter=it, tol=0),
        f"cp3 r={r_cp} {it} it": lambda w, s: S.cp3(w, s, r_cp, max_iter=it, tol=0),
        f"cp4 r={r_cp} {it} it": lambda w, s: S.cp4(w, s, r_cp, max_iter=it, tol=0),
        f"stable_cp3 r={r_cp // 2} 3 sweeps": lambda w, s: S.stable_cp3(
            w, s, r_cp // 2, max_sweeps=3, cp_options={"max_iter": it, "tol": 0}),
        f"lowrank_sparse r={r_svd // 2} nnz={nnz} 3 it": lambda w, s: S.lowrank_sparse(
            w, s, r_svd // 2, nnz, max_iter=3, tol=0),
        f"sigma_prune nnz={2 * nnz}": lambda w, s: S.sigma_prune(w, s, 2 * nnz),
    }


def solver_table(devices, args, model, moments, failures) -> None:
    layer_name = "layer2.1.conv1" if args.quick else "layer3.1.conv1"
    if layer_name not in moments:
        failures.append(f"solvers: no Sigma for {layer_name} (calibration failed)")
        log(f"\n## Solvers: skipped, no Sigma for {layer_name}")
        return
    from ddtd.layers import get_module

    layer = get_module(model, layer_name)
    W = layer.weight.detach().float()
    sigma = moments[layer_name].covariance()[0]
    T, D = W.shape[0], W[0].numel()
    log(f"\n## Solvers: {layer_name} of the ResNet-18, weight {tuple(W.shape)}, its centred Sigma ({D} x {D}) "
        "from the calibration above (seconds; error = relative Sigma error of the result)")
    head = "| solver | " + " | ".join(f"{d.type} s" for d in devices)
    head += (" | GPU speed-up" if len(devices) == 2 else "") + " | " + " | ".join(f"{d.type} error" for d in devices)
    log(head + " |")
    log("|---" * (1 + 2 * len(devices) + (len(devices) == 2)) + "|")
    for dev in devices:  # warm-up on a small layer: kernels, cuSOLVER / cuBLAS handles, plans
        if dev.type == "cuda":
            from synthetic import activation_sigma, structured_kernel

            w, s = structured_kernel(32, 32, 3).to(dev), activation_sigma(32, 3, 8, 8).to(dev)
            for call in solver_cases(True, 32, 288).values():
                call(w, s)
    for name, call in solver_cases(args.quick, T, D).items():
        row, errs, secs = [name], [], []
        if over_time(args):
            log(f"| {name} | left out: the run is past --time-limit {args.time_limit:.0f} s |")
            continue
        try:
            for dev in devices:
                w, s = W.to(dev), sigma.to(dev)
                t, res = timed(lambda: call(w, s), dev, 1)
                secs.append(t)
                errs.append(res.rel_error)
            row += [f"{t:.2f}" for t in secs]
            if len(devices) == 2:
                row.append(f"{secs[0] / secs[1]:.1f}x")
                if abs(errs[1] - errs[0]) > 0.02 * errs[0] + 1e-6:
                    failures.append(f"solver {name}: GPU error {errs[1]:.5f} vs CPU {errs[0]:.5f}")
            row += [f"{e:.5f}" for e in errs]
        except Exception as exc:
            failures.append(f"solver {name}: {type(exc).__name__}: {exc}")
            row.append(f"FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        log("| " + " | ".join(row) + " |")


# ------------------------------------------------------------------------------ compress

def compress_table(dev, args, failures) -> None:
    import torchvision

    import ddtd

    n, size = min(args.images, 64), 224
    x = photos(n, size, seed=1)
    log(f"\n## Compress: ResNet-18 (random weights), {n} photos at {size} px, ratio 2, method svd, on {dev}")
    try:
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        sync(dev)
        t = time.perf_counter()
        config = ddtd.CompressConfig(method=ddtd.SvdConfig(), size=ddtd.Size(ratio=2), device=dev,
                                     calibration=ddtd.CalibrationConfig(show_progress=False))
        res = ddtd.compress(model, x, config)
        sync(dev)
        wall = time.perf_counter() - t
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in res.report.seconds.items())
        log(f"wall {wall:.1f} s ({stages}); params ratio {res.report.ratio:.2f}x, MACs ratio "
            f"{res.report.macs_ratio:.2f}x; compressed model on {next(res.model.parameters()).device}")
        fid = getattr(res.report, "fidelity", None) or {}
        if fid.get("heldout"):
            log(f"held-out fidelity: {fid['heldout']}")
    except Exception as exc:
        failures.append(f"compress: {type(exc).__name__}: {exc}")
        log(f"FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc()


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (default cuda)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a CPU-only run in a minute or two)")
    ap.add_argument("--images", type=int, default=96, help="calibration images at 224 px (default 96)")
    ap.add_argument("--repeats", type=int, default=3, help="timed GPU calibration runs (median; default 3)")
    ap.add_argument("--no-compress", action="store_true", help="skip the whole-compress timing")
    ap.add_argument("--time-limit", type=float, default=210.0,
                    help="seconds after which no further solver or section is started (default 210)")
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA GPU is available (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); use --device cpu", file=sys.stderr)
        return 2
    devices = [torch.device("cpu")] + ([dev] if dev.type != "cpu" else [])
    torch.backends.cuda.matmul.allow_tf32 = False  # the same float32 products as the CPU
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True

    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    log(f"# python benchmarks/gpu_timing.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__} (CUDA {torch.version.cuda}); GPU: {gpu}; "
        f"CPU: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    failures: list[str] = []
    model, moments = calibration_table(devices, args, failures)
    save(args)
    solver_table(devices, args, model, moments, failures)
    save(args)
    if dev.type == "cuda" and not args.quick and not args.no_compress:
        if over_time(args):
            log(f"\n## Compress: left out, the run is past --time-limit {args.time_limit:.0f} s")
        else:
            compress_table(dev, args, failures)
    log(f"\ntotal {time.time() - T0:.0f} s; " + ("all sections ran" if not failures else
                                                 f"{len(failures)} FAILED: " + "; ".join(failures)))
    save(args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
