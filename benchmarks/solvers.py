"""Benchmark of ddtd.solvers against tensorly (pytorch backend), side by side in one run.

    .venv/bin/python benchmarks/solvers.py            # full: (256,256,3,3) R=128, (512,512,3,3) R=256,
                                                      #       Tucker2 (128,128) on (512,512,3,3)
    .venv/bin/python benchmarks/solvers.py --quick    # smaller sizes, a minute or so

Sigma: centred covariance of unfolded 3x3 patches of ReLU activations (random conv on
channel- and space-correlated Gaussian images, ddtd.solvers.synthetic), i.e. a realistic,
strongly anisotropic, non-Kronecker covariance.  Kernel: power-law singular spectrum + noise.
Every method runs the same number of iterations; "s/it" is wall time / iterations (all setup
and init included).  Errors are relative squared errors: "fro" = ||K - K~||^2 / ||K||^2,
"sigma" = tr(dW Sigma dW^T) / tr(W Sigma W^T).  "to-eq s" = ddtd wall time until its error
(in its own norm) first reached tensorly's final error in that norm, estimated as
total time * (iterations needed / iterations run), setup included (equal-error comparison).
GFLOP/s counts the large products of ddtd's algorithms (model in `flops_*`), against the float32 matmul peak measured
at the start of the run.  The machine is shared: compare ratios within one run.
The latest output is written to benchmarks/results/solvers.txt.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ddtd.solvers._common as common  # noqa: E402
import ddtd.solvers.cp as cpmod  # noqa: E402
tkmod = sys.modules["ddtd.solvers.tucker2"]
from ddtd.solvers import cp_als, tucker2  # noqa: E402
from ddtd.solvers.synthetic import activation_sigma, structured_kernel  # noqa: E402

OUT = io.StringIO()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    OUT.write(s + "\n")


# ---- count CG steps (for the flop model) ----
CG_STEPS = [0]
_pcg = common.pcg


def _counting_pcg(*a, **k):
    out = _pcg(*a, **k)
    CG_STEPS[0] += out[1]
    return out


cpmod.pcg = _counting_pcg
tkmod.pcg = _counting_pcg


def matmul_peak():
    a = torch.randn(4096, 4096)
    b = torch.randn(4096, 4096)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 ** 3 / best / 1e9


def errs(K, Kh, Sig):
    T = K.shape[0]
    W = K.reshape(T, -1).double()
    dW = W - Kh.reshape(T, -1).double()
    fro = float((dW ** 2).sum() / (W ** 2).sum())
    sg = float(((dW @ Sig) * dW).sum() / ((W @ Sig) * W).sum())
    return fro, sg


def flops_cp_frob(T, D, R, iters):
    return iters * 4.0 * T * D * R                  # W @ KR and A^T W per iteration


def flops_cp_sigma(T, D, R, iters, dims, cg_steps):
    per = 2 * T * D * R + 2 * D * R * R + 2 * D * T * R          # W S M, M^T S M, S W^T A
    direct = sum(1 for n in dims[1:])
    per += direct * (2.0 * D * D * R + 2.0 * max(dims[1:]) * D * R * R)
    return iters * per + cg_steps * 2.0 * D * D * R + 2.0 * T * D * D   # + W Sigma once


def flops_tucker_sigma(T, S, P, R1, R2, iters, cg_steps):
    D = S * P
    per = 2.0 * D * D * R2 + 2.0 * D * R2 * R2 * P + 2.0 * T * D * R2   # Sigma Q, Q^T S Q, W S Q
    per += 2.0 * D * T * R1 + 2.0 * D * R1 * R2 * P                      # rhs
    cg = cg_steps * (2.0 * D * D * R2 + 2.0 * S * P * P * R2 * R2)
    return iters * per + cg + 2.0 * T * D * D


def row(name, it, secs, fro, sg, gflop=None, peak=None, ref=None, to_eq=None):
    gf = f"{gflop / 1e9 / secs:7.1f} ({100 * gflop / 1e9 / secs / peak:3.0f}%)" if gflop else " " * 14
    rat = f"{ref / secs:6.2f}x" if ref else "      -"
    te = f"{to_eq:7.2f}" if to_eq is not None else "      -"
    log(f"  {name:<34} {it:>4} {secs:8.2f} {secs / it:8.3f} {rat} {te} {fro:10.5f} {sg:10.5f} {gf}")


def header():
    log(f"  {'method':<34} {'it':>4} {'total s':>8} {'s/it':>8} {'tl/this':>7} {'to-eq s':>7} "
        f"{'err fro':>10} {'err sigma':>10} {'GFLOP/s (% peak)':>16}")


def time_to(hist, target, secs):
    for i, h in enumerate(hist):
        if h <= target * (1 + 1e-6):
            return secs * (i + 1) / len(hist)
    return None


def bench_cp(T, S, R, iters, peak, tl):
    from tensorly.decomposition import parafac
    K = structured_kernel(T, S, 3, seed=1)
    D = S * 9
    t = time.perf_counter()
    Sig = activation_sigma(S, 3, n_images=max(32, (3 * D) // 196 + 1), size=14, seed=0)
    ev = torch.linalg.eigvalsh(Sig)
    log(f"\nCP: kernel ({T}, {S}, 3, 3), rank {R}, {iters} iterations; Sigma {D}x{D} from "
        f"activations (built in {time.perf_counter() - t:.1f} s, eig max/min "
        f"{float(ev[-1] / ev[0].clamp_min(1e-300)):.1e})")
    header()
    Sig32 = Sig.float()
    # tensorly parafac on the 4-way kernel (= cp4 layout), random init, no early stop
    torch.manual_seed(0)
    t = time.perf_counter()
    cpt = parafac(K, rank=R, n_iter_max=iters, init="random", tol=0, random_state=0)
    tl_s = time.perf_counter() - t
    w, f = cpt
    Kh = torch.einsum("r,tr,sr,ir,jr->tsij", w, *f)
    tl_fro, tl_sg = errs(K, Kh, Sig)
    row("tensorly parafac (cp4, random)", iters, tl_s, tl_fro, tl_sg)
    # tensorly svd init, for reference
    t = time.perf_counter()
    cpt = parafac(K, rank=R, n_iter_max=iters, init="svd", tol=0)
    tl2_s = time.perf_counter() - t
    w, f = cpt
    e2 = errs(K, torch.einsum("r,tr,sr,ir,jr->tsij", w, *f), Sig)
    row("tensorly parafac (cp4, svd init)", iters, tl2_s, *e2, ref=tl_s)
    tl_best = min(tl_fro, e2[0])
    tl_best_sg = min(tl_sg, e2[1])
    for layout, dims in (("cp4", (S, 3, 3)), ("cp3", (S, 9))):
        res = cp_als(K, None, R, layout=layout, max_iter=iters, tol=0)
        fro, sg = errs(K, res.kernel(), Sig)
        row(f"ddtd {layout} Frobenius (svd init)", res.n_iter, res.seconds, fro, sg,
            flops_cp_frob(T, D, R, res.n_iter), peak, ref=tl_s * res.n_iter / iters,
            to_eq=time_to(res.raw_history, tl_best, res.seconds))
        CG_STEPS[0] = 0
        res = cp_als(K, Sig32, R, layout=layout, max_iter=iters, tol=0)
        fro, sg = errs(K, res.kernel(), Sig)
        row(f"ddtd {layout} Sigma (frobenius init)", res.n_iter, res.seconds, fro, sg,
            flops_cp_sigma(T, D, R, res.n_iter, dims, CG_STEPS[0]), peak,
            ref=tl_s * res.n_iter / iters,
            to_eq=time_to(res.raw_history, tl_best_sg, res.seconds))
        log(f"      ({CG_STEPS[0]} CG steps in total)")


def bench_tucker(T, S, R1, R2, iters, peak):
    from tensorly.decomposition import partial_tucker
    K = structured_kernel(T, S, 3, seed=2)
    D = S * 9
    Sig = activation_sigma(S, 3, n_images=max(32, (3 * D) // 196 + 1), size=14, seed=3)
    log(f"\nTucker2: kernel ({T}, {S}, 3, 3), ranks ({R1}, {R2}), up to {iters} iterations")
    header()
    t = time.perf_counter()
    (core, fac), _ = partial_tucker(K, rank=[R1, R2], modes=[0, 1], n_iter_max=iters, tol=0,
                                    init="svd")
    tl_s = time.perf_counter() - t
    Kh = torch.einsum("abij,ta,sb->tsij", core, fac[0], fac[1])
    tl_e = errs(K, Kh, Sig)
    row("tensorly partial_tucker (svd)", iters, tl_s, *tl_e)
    res = tucker2(K, None, (R1, R2), max_iter=iters, tol=0, init="hosvd")
    row("ddtd tucker2 Frobenius (HOOI)", res.n_iter, res.seconds, *errs(K, res.kernel(), Sig),
        ref=tl_s * res.n_iter / iters, to_eq=time_to(res.raw_history, tl_e[0], res.seconds))
    CG_STEPS[0] = 0
    t = time.perf_counter()
    res = tucker2(K, Sig.float(), (R1, R2), max_iter=iters, tol=1e-5)
    total = time.perf_counter() - t
    row("ddtd tucker2 Sigma (whitened init)", res.n_iter, total, *errs(K, res.kernel(), Sig),
        flops_tucker_sigma(T, S, 9, R1, R2, res.n_iter, CG_STEPS[0]), peak,
        ref=tl_s * res.n_iter / iters, to_eq=time_to(res.raw_history, tl_e[1], total))
    log(f"      ({CG_STEPS[0]} CG steps; converged={res.converged}; wall incl. setup {total:.1f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--iters", type=int, default=None, help="CP iterations (default 10; quick 10)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "solvers.txt"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice). Use 1 when another process "
                    "keeps a core busy: OpenMP with more threads than free cores stalls")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tensorly as tl
    tl.set_backend("pytorch")
    warnings.filterwarnings("ignore", category=UserWarning, module="tensorly")
    torch.manual_seed(0)
    iters = args.iters or 10
    peak = matmul_peak()
    log("command: .venv/bin/python benchmarks/solvers.py " + " ".join(sys.argv[1:]))
    log(f"ddtd solver benchmark  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"tensorly {tl.__version__} (pytorch backend)")
    log(f"float32 matmul peak (4096^3): {peak:.1f} GFLOP/s;  load average: "
        f"{os.getloadavg()[0]:.2f}")
    log("columns: it = iterations; tl/this = tensorly (parafac random init / partial_tucker) s/it "
        "divided by this s/it (higher = faster than tensorly); to-eq s = seconds until ddtd's "
        "error in its own norm (Frobenius rows: fro, Sigma rows: sigma) first reached tensorly's "
        "best final error in that norm")
    t0 = time.perf_counter()
    if args.quick:
        bench_cp(128, 128, 64, iters, peak, tl)
        bench_tucker(256, 256, 64, 64, 20, peak)
    else:
        bench_cp(256, 256, 128, iters, peak, tl)
        bench_cp(512, 512, 256, iters, peak, tl)
        bench_tucker(512, 512, 128, 128, 25, peak)
    log(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(OUT.getvalue())


if __name__ == "__main__":
    main()
