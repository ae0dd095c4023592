"""Low-rank + sparse at equal storage: output error and latency.

Run: ``.venv/bin/python benchmarks/lrs.py [--quick]`` (writes ``benchmarks/results/lrs.txt``).
Solver timing only (the ``ddtd.methods`` ``_lrs`` path on 3x3 convs 64x576 ... 512x4608):
``.venv/bin/python benchmarks/lrs.py --timing [--sizes 64,128] [--reference-max 128]``.

Storage is counted in 4-byte units: factors + values, plus one int32 index per nonzero (see
``ddtd.solvers.lrs.INDEX_UNITS``).  Errors are the relative output error
``E||(W - W~) x||^2 / E||W x||^2`` on *held-out* activations (other images of the same distribution than
the ones the Sigma was computed on), so they also show generalisation of the Sigma fit.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as Fn
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # the synthetic layers of the tests

from ddtd.layers.sparse import LowRankSparse  # noqa: E402
from ddtd.solvers.lrs import (INDEX_UNITS, lowrank_sparse, magnitude_prune, sigma_prune,  # noqa: E402
                              split_budget)
from ddtd.solvers.svd import sigma_svd  # noqa: E402
from synthetic import activation_images, activation_sigma, structured_kernel  # noqa: E402

F64 = torch.float64


def dw_inputs(C, n, size, seed):
    """Inputs of a pointwise conv in a depthwise-separable block: ReLU(depthwise 3x3(acts))."""
    x = activation_images(C, n, size, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    k = torch.randn(C, 1, 3, 3, generator=g) / 3
    return torch.relu(Fn.conv2d(x, k, padding=1, groups=C))


def samples(kind, C, seed):
    """``(calibration samples, held-out samples, held-out images)``: one image distribution, split
    by image (first half calibrates)."""
    if kind == "pw":        # 1x1 conv on ReLU activations (MobileNet expand)
        x = activation_images(C, 96, 14, seed)
    elif kind == "dws":     # pointwise after a depthwise conv
        x = dw_inputs(C, 96, 14, seed)
    else:                   # Linear on token features (one sample per token)
        x = activation_images(C, 48, 8, seed)
    h = x.shape[0] // 2
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, C).to(F64)  # noqa: E731
    return flat(x[:h]), flat(x[h:]), x[h:]


def out_err(X, W, Wt):
    return float(((X @ (W - Wt).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def latency(m, x, n=30):
    with torch.no_grad():
        for _ in range(3):
            m(x)
        t = time.perf_counter()
        for _ in range(n):
            m(x)
    return (time.perf_counter() - t) / n * 1e3


def lrs_path(W, sigma, budget, search="refine", **kw):
    """What ``ddtd.methods._lrs`` runs at a budget: the split search (4 rounds per split), then
    the chosen split refitted (20 rounds, ``init='auto'``).  Returns ``(wall s, cpu s, result)``
    (the CPU time of this process: the wall time depends on the machine's load)."""
    t0, c0 = time.perf_counter(), time.process_time()
    rank, nnz, _, _ = split_budget(W, sigma, budget, lowrank="svd", max_iter=4, name="conv",
                                   search=search, **kw)
    res = lowrank_sparse(W, sigma, rank, nnz, lowrank="svd", max_iter=20, name="conv", **kw)
    return time.perf_counter() - t0, time.process_time() - c0, res


def timing(say, sizes, reference_max):
    """Seconds and final relative Sigma error of the ``_lrs`` path on a ``C -> C`` 3x3 conv
    (``D = 9 C``) at half the dense storage, Sigma = uncentred covariance of ReLU activations of
    a random conv on correlated noise (3 D samples).  ``new`` = the defaults (size-batched,
    cached row factorisations, refined split search, CG for supports too costly to factorise);
    ``reference`` = ``row_solver='exact', search='grid'`` (every row solve an exact
    factorisation, every split fraction fitted).  Wall and CPU seconds of this process (on a
    loaded machine the wall time is several times the CPU time)."""
    say()
    say("timing: ddtd.methods._lrs path (split_budget max_iter=4 + refit max_iter=20, init auto), "
        "3x3 conv C->C, budget = dense / 2, 1 thread")
    say(f"  {'layer':>10s} {'new wall/cpu s':>15s} {'new err':>10s} {'rank/nnz':>12s} "
        f"{'ref wall/cpu s':>15s} {'ref err':>10s} {'rank/nnz':>12s}")
    for C in sizes:
        D = 9 * C
        sigma = activation_sigma(C, 3, max(16, (3 * D) // 196 + 1), 14, seed=1, centred=False)
        W = structured_kernel(C, C, 3, seed=3, decay=0.5, noise=0.5).to(F64)
        budget = W.numel() // 2
        cols = []
        runs = [{}] + ([dict(row_solver="exact", search="grid")] if C <= reference_max else [])
        for kw in runs:
            wall, cpu, res = lrs_path(W, sigma, budget, **kw)
            cols.append(f"{f'{wall:.1f}/{cpu:.1f}':>15s} {res.rel_error:10.5f} "
                        f"{f'{res.rank[0]}/{res.nnz}':>12s}")
        if len(cols) == 1:
            cols.append(f"{'-':>15s} {'-':>10s} {'-':>12s}")
        say(f"  {f'{C}x{D}':>10s} {cols[0]} {cols[1]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timing", action="store_true", help="only the solver timing section")
    ap.add_argument("--sizes", default="64,128,256,512", help="timing: conv widths C (D = 9 C)")
    ap.add_argument("--reference-max", type=int, default=128,
                    help="timing: run the exact-everything reference up to this width")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lrs.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"command: .venv/bin/python benchmarks/lrs.py{' --quick' if args.quick else ''}")
    say(f"ddtd low-rank + sparse benchmark  torch {torch.__version__}  threads 1  "
        f"{platform.machine()}  load {os.getloadavg()[0]:.2f}")
    say("storage units = 4-byte words: factors + values + 1 int32 index per nonzero; "
        "errors = relative output error on held-out images (Sigma from the other half)")
    if args.timing:
        timing(say, [int(c) for c in args.sizes.split(",")], args.reference_max)
        out = os.path.splitext(args.out)[0] + "_timing.txt"
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return
    cases = [("1x1 conv 96->576 (MobileNet expand)", "pw", 96, 576, 1.0),
             ("pointwise 144->48 after depthwise 3x3", "dws", 144, 48, 0.6),
             ("Linear 384->384 (tokens)", "lin", 384, 384, 0.7)]
    if args.quick:
        cases = cases[:1]
    for title, kind, C, T, decay in cases:
        Xc, Xh, ximg = samples(kind, C, seed=1)
        sigma = Xc.T @ Xc / Xc.shape[0]                     # uncentred: the output error
        W = structured_kernel(T, C, 1, seed=3, decay=decay, noise=0.5).reshape(T, C).to(F64)
        D = C
        say()
        say(f"{title}: W {T}x{D}, dense {T * D} units; calibration {Xc.shape[0]} samples, "
            f"held-out {Xh.shape[0]}")
        say(f"  {'method':44s} {'rank':>5s} {'nnz':>7s} {'units':>7s} {'err calib':>10s} "
            f"{'err held-out':>12s} {'s':>6s}")
        for frac in (0.5, 0.25):
            budget = int(frac * T * D)
            t0 = time.perf_counter()
            rank, nnz, _, table = split_budget(W, sigma, budget, max_iter=10, name=title)
            t_split = time.perf_counter() - t0
            rows = []
            r_lr = budget // (T + D)
            lr = sigma_svd(W, sigma, r_lr, dtype=F64)
            rows.append(("low-rank only (Sigma-SVD)", r_lr, 0, lr.A @ lr.B, 0.0))
            lf = sigma_svd(W, None, r_lr, dtype=F64)
            rows.append(("low-rank only (Frobenius SVD)", r_lr, 0, lf.A @ lf.B, 0.0))
            k = budget // (1 + INDEX_UNITS)
            rows.append(("magnitude pruning", 0, k, magnitude_prune(W, sigma, k, dtype=F64).matrix(), 0.0))
            rows.append(("Sigma pruning (energy support, exact values)", 0, k,
                         sigma_prune(W, sigma, k, dtype=F64).matrix(), 0.0))
            for lab, s, init in (("seed residual init, Frobenius (eq. 12)", None, "residual"),
                                 ("seed masked init, Frobenius (eq. 13-14)", None, "masked"),
                                 ("seed residual init, Sigma-SVD", sigma, "residual"),
                                 ("seed masked init, Sigma fit", sigma, "masked")):
                res = lowrank_sparse(W, s, rank, nnz, init=init, max_iter=0, dtype=F64)
                rows.append((lab, rank, nnz, res.matrix(), res.seconds))
            fit = lowrank_sparse(W, sigma, rank, nnz, init="auto", max_iter=40, dtype=F64)
            rows.append((f"ddtd fit (auto init, {fit.n_iter} rounds)", rank, nnz, fit.matrix(),
                         fit.seconds))
            say(f"  -- budget {frac:g} of dense = {budget} units; split_budget chose rank {rank}, "
                f"nnz {nnz} ({t_split:.1f} s; splits tried: "
                + ", ".join(f"r{r}/{e:.4f}" for _, r, n, e in table) + ")")
            for lab, r, n, Wt, sec in rows:
                units = r * (T + D) + n * (1 + INDEX_UNITS)
                say(f"  {lab:44s} {r:5d} {n:7d} {units:7d} {out_err(Xc, W, Wt):10.5f} "
                    f"{out_err(Xh, W, Wt):12.5f} {sec:6.2f}")
            if frac == 0.25:
                # latency of the layer at this budget
                if kind == "lin":
                    layer = nn.Linear(D, T)
                    x = torch.randn(8, 64, D)
                else:
                    layer = nn.Conv2d(D, T, 1)
                    x = ximg[:8].float()
                with torch.no_grad():
                    layer.weight.copy_(W.reshape(layer.weight.shape))
                res32 = lowrank_sparse(W, sigma, rank, nnz, init="data", max_iter=3)
                lat = {"dense": latency(layer, x)}
                for fm in ("merged", "chain", "sparse"):
                    lat[fm] = latency(LowRankSparse.from_result(layer, res32, forward_mode=fm), x)
                say(f"  latency (input {tuple(x.shape)}, ms): " +
                    "  ".join(f"{k} {v:.2f}" for k, v in lat.items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
