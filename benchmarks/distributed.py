"""Calibration and compression on 1, 2 and 4 processes (gloo, loopback), ratios to 1 process.

    python benchmarks/distributed.py                      # 256 random 32 px images, 1 2 4 processes
    python benchmarks/distributed.py --images 128 --out benchmarks/results/distributed.txt

The reference ResNet is torchvision's ``resnet18(num_classes=10)`` with seeded random weights on
random 32 x 32 inputs (the timings do not depend on the weights). For each process count a fresh
group is started (``torch.multiprocessing`` spawn, ``init_process_group("gloo")`` on 127.0.0.1),
each process gets ``cores // N`` threads (at least 1), and after a warm-up pass the wall time of
``ddtd.calibrate`` and of ``ddtd.compress`` (svd, 2x, no sequential fitting, so the layer solves
are split) is the slowest rank's, between two barriers. Process start-up (importing torch, a few
seconds) is not included. 1 process runs without a group.

Also printed: the communication volume per layer, the bytes each rank puts into the
``all_reduce`` of the float64 sums (``xxT`` and ``x_sum``: ``8 g (D^2 + D)``), the same for any
number of processes.

On a machine with fewer cores than processes the point is the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18(num_classes=10).eval()


def _worker(rank: int, world: int, port: int, n: int, queue) -> None:
    import ddtd
    from ddtd import distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = _model()
    data = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cal = ddtd.CalibrationConfig(batch_size=64, show_progress=False)
    config = ddtd.config_from_options(method="svd", ratio=2.0, sequential="off", batch_size=64)

    def timed(fn):
        distributed.agree()
        t = time.perf_counter()
        out = fn()
        return out, max(distributed.agree(time.perf_counter() - t))

    ddtd.calibrate(model, data[: 2 * world], cal, check_variance=False)  # warm-up
    res, t_cal = timed(lambda: ddtd.calibrate(model, data, cal, check_variance=False))
    _, t_comp = timed(lambda: ddtd.compress(model, data, config))
    if rank == 0:
        volume = {name: (lm.xxT.numel() + lm.x_sum.numel()) * 8 for name, lm in res.moments.items()}
        queue.put((world, t_cal, t_comp, volume))
    if world > 1:
        torch.distributed.destroy_process_group()


def run(procs: list[int], n: int) -> dict:
    from ddtd.distributed import free_port

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    out = {}
    for world in procs:
        port = free_port()
        ps = [ctx.Process(target=_worker, args=(r, world, port, n, queue)) for r in range(world)]
        for p in ps:
            p.start()
        got = queue.get(timeout=600)
        for p in ps:
            p.join()
        if any(p.exitcode for p in ps):
            raise SystemExit(f"a process of the {world}-process run failed")
        out[world] = got
    return out


def report(results: dict, n: int) -> str:
    base = results[min(results)]
    lines = [f"reference ResNet-18 (torchvision, num_classes=10, random weights), {n} random 32 px inputs, "
             f"{os.cpu_count()} CPU cores, gloo on 127.0.0.1, threads per process = cores // N", "",
             f"{'processes':>9} {'calibrate s':>12} {'ratio':>6} {'compress s':>11} {'ratio':>6}"]
    for world, (_, t_cal, t_comp, _) in sorted(results.items()):
        lines.append(f"{world:>9} {t_cal:>12.2f} {t_cal / base[1]:>6.2f} {t_comp:>11.2f} {t_comp / base[2]:>6.2f}")
    volume = base[3]
    lines += ["", "all-reduce volume per layer (bytes each rank sends into the SUM; the same for any N):"]
    lines += [f"  {name:24s} {b:>12,d}" for name, b in volume.items()]
    lines.append(f"  {'total':24s} {sum(volume.values()):>12,d}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    text = report(run(args.procs, args.images), args.images)
    print(text)
    if args.out:
        args.out.write_text(f"$ python benchmarks/distributed.py --images {args.images} --procs "
                            f"{' '.join(map(str, args.procs))}\n\n{text}\n")


if __name__ == "__main__":
    main()
