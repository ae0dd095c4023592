"""Benchmark: CP-ALS-Sigma vs sensitivity-minimising CP (CPD-EPC, Sigma) under factor rounding.

    .venv/bin/python benchmarks/stable_cp.py            # full (a few minutes)
    .venv/bin/python benchmarks/stable_cp.py --quick    # one small case
    .venv/bin/python benchmarks/stable_cp.py --timing-only --timing-sizes 64,128,256,512

Second section ("timing"): seconds of stable_cp on 64-, 128-, 256- and 512-channel 3x3 layers
(ranks about 8x compression for the wide ones) with the call the pipeline makes (max_sweeps=30,
tol=1e-3, direct_max=1024), old settings (rows='block': exact row blocks of floor(1024 / R)
rows, no extrapolation, no GFLOP cap -- the original scheme; only up to --old-max channels, it
takes minutes) next to the new defaults (majorised rows, extrapolation, max_gflop=400).

Setting: a trained-like kernel (power-law spectrum + noise, tests/synthetic.py: structured_kernel)
and the centred covariance Sigma of unfolded 3x3 patches of synthetic ReLU activations
(activation_sigma).  CP-ALS-Sigma (cp3, float64, up to --als-iter iterations) is the start and sets
delta^2 = its Sigma error; stable CP minimises the sensitivity at that error.

Rows: "cp-als" = the CP-ALS factors as returned (unit B, C columns, A carries the scale);
"cp-als bal" = the same rank-one terms with the optimal column scaling (ddtd.solvers.stable_cp.balance,
W~ unchanged); "stable" = stable_cp.  Columns (all relative squared Sigma errors
tr(dW Sigma dW^T) / tr(W Sigma W^T) of the kernel rebuilt in float64 from the factors):
  err f32   factors as fitted (float32 storage)
  err f16   every factor rounded to float16
  err i8/oc every factor rounded to int8, symmetric, one scale per output channel of the layer it
            becomes (A: per row = output channel of the last 1x1 conv; B, C: per column = the R
            channels of the first 1x1 / depthwise conv)
  err i8/col every factor rounded to int8, one scale per factor column
  ss        sensitivity sum_n I_n sum_r prod_{m != n} ||F_m[:, r]||^2 of the factors as stored
The latest output is written to benchmarks/results/stable_cp.txt.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the synthetic layers of the tests

from ddtd.solvers import cp_als  # noqa: E402
from ddtd.solvers.stable_cp import balance, sensitivity, stable_cp  # noqa: E402
from synthetic import activation_sigma, structured_kernel  # noqa: E402

F64 = torch.float64
OUT = io.StringIO()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    OUT.write(s + "\n")


def q_int8(F: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric int8 rounding with one scale per slice along ``dim`` (``dim=0``: per row)."""
    amax = F.abs().amax(dim=1 - dim, keepdim=True).clamp_min(1e-300)
    s = amax / 127.0
    return torch.clamp(torch.round(F / s), -127, 127) * s


def rel_err(W, S, facs, base):
    A, B, C = [f.to(F64) for f in facs]
    K = torch.einsum("tr,sr,pr->tsp", A, B, C).reshape(W.shape)
    dW = W - K
    return float(((dW @ S) * dW).sum()) / base


def evaluate(W, S, facs, base):
    f32 = [f.to(torch.float32).to(F64) for f in facs]
    f16 = [f.to(torch.float16).to(F64) for f in facs]
    oc = [q_int8(f32[0], 0), q_int8(f32[1], 1), q_int8(f32[2], 1)]
    col = [q_int8(f, 1) for f in f32]
    return dict(f32=rel_err(W, S, f32, base), f16=rel_err(W, S, f16, base),
                oc=rel_err(W, S, oc, base), col=rel_err(W, S, col, base), ss=sensitivity(*f32))


def run_case(T, S_, R, args):
    K = structured_kernel(T, S_, 3, seed=0)
    Sig = activation_sigma(S_, 3, n_images=64, size=16, seed=0)
    W = K.reshape(T, -1).to(F64)
    base = float(((W @ Sig) * W).sum())
    t0 = time.perf_counter()
    als = cp_als(K, Sig, R, layout="cp3", max_iter=args.als_iter, tol=1e-9, dtype=F64)
    t_als = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = stable_cp(K, Sig, R, layout="cp3", init=als, max_sweeps=args.sweeps, dtype=F64)
    t_st = time.perf_counter() - t0
    rows = [("cp-als", (als.A, als.B, als.C), t_als, als.n_iter),
            ("cp-als bal", balance(als.A, als.B, als.C)[:3], t_als, als.n_iter),
            ("stable", (st.A, st.B, st.C), t_st, st.n_iter)]
    log(f"\nkernel ({T}, {S_}, 3, 3), cp3 rank {R}; Sigma {Sig.shape[0]}x{Sig.shape[0]}; "
        f"delta^2 / base = {st.delta ** 2 / base:.5g}; stable: {st.n_iter} sweeps, "
        f"converged={st.converged}, ss {st.sensitivity_before:.4g} -> {st.sensitivity_after:.4g}")
    log(f"  {'method':<11} {'it':>4} {'sec':>7} {'err f32':>10} {'err f16':>10} {'err i8/oc':>10} "
        f"{'err i8/col':>10} {'ss':>10}  i8/oc-f32")
    for nm, facs, sec, it in rows:
        m = evaluate(W, Sig, facs, base)
        log(f"  {nm:<11} {it:>4} {sec:>7.1f} {m['f32']:>10.5f} {m['f16']:>10.5f} {m['oc']:>10.5f} "
            f"{m['col']:>10.5f} {m['ss']:>10.4g}  {m['oc'] - m['f32']:>9.2e}")


TIMING_CASES = {64: 133, 128: 181, 256: 141, 512: 285}


def timing_case(C, R, args):
    D = C * 9
    t0 = time.perf_counter()
    K = structured_kernel(C, C, 3, seed=0)
    Sig = activation_sigma(C, 3, n_images=max(32, math.ceil(2 * D / 256)), size=16, seed=0)
    als = cp_als(K, Sig, R, layout="cp3", max_iter=args.timing_als_iter, tol=1e-9, dtype=F64)
    log(f"\n({C}, {C}, 3, 3) cp3 rank {R}: Sigma {D}x{D}, CP-ALS {als.n_iter} it "
        f"(setup {time.perf_counter() - t0:.0f}s), raw ss {sensitivity(als.A, als.B, als.C):.4g}")
    log(f"  {'settings':<34} {'sec':>7} {'sweeps':>6} {'ss before':>10} {'ss after':>10} "
        f"{'ratio':>6} {'err before':>11} {'err after':>11}")
    runs = [("new (defaults)", {})]
    if C <= args.old_max:
        runs.insert(0, ("old (rows=block, no extrap/cap)",
                        dict(rows="block", extrapolate=False, max_gflop=None)))
    for nm, kw in runs:
        t0 = time.perf_counter()
        st = stable_cp(K, Sig, R, layout="cp3", init=als, max_sweeps=30, tol=1e-3, direct_max=1024,
                       dtype=F64, **kw)
        sec = time.perf_counter() - t0
        log(f"  {nm:<34} {sec:>7.1f} {st.n_iter:>6} {st.sensitivity_before:>10.4g} "
            f"{st.sensitivity_after:>10.4g} {st.sensitivity_before / st.sensitivity_after:>6.3f} "
            f"{st.init_rel_error:>11.6g} {st.rel_error:>11.6g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--als-iter", type=int, default=200)
    ap.add_argument("--sweeps", type=int, default=40)
    ap.add_argument("--timing-only", action="store_true", help="only the timing section")
    ap.add_argument("--timing-sizes", default="64,128,256,512",
                    help="channel counts of the timing section (comma separated; '' to skip)")
    ap.add_argument("--timing-als-iter", type=int, default=25)
    ap.add_argument("--old-max", type=int, default=64,
                    help="run the old settings up to this many channels (slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log("command: .venv/bin/python benchmarks/stable_cp.py" + " ".join([""] + sys.argv[1:]))
    log(f"ddtd stable CP benchmark  torch {torch.__version__}  threads {args.threads}  "
        f"als-iter {args.als_iter}  sweeps {args.sweeps}")
    log("errors: relative squared Sigma error of the kernel rebuilt from the (rounded) factors")
    cases = [(32, 32, 48)] if args.quick else [(32, 32, 48), (64, 64, 96)]
    if not args.timing_only:
        for T, S_, R in cases:
            run_case(T, S_, R, args)
    sizes = [int(x) for x in args.timing_sizes.split(",") if x.strip()]
    if args.quick and not args.timing_only:
        sizes = []
    if sizes:
        log("\n== timing (1 thread unless --threads): stable_cp as the pipeline calls it")
        for C in sizes:
            timing_case(C, TIMING_CASES.get(C, max(8, C * C * 9 // (8 * (2 * C + 9)))), args)
    if not args.quick:
        fn = "stable_cp_timing.txt" if args.timing_only else "stable_cp.txt"
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", fn)
        with open(path, "w") as f:
            f.write(OUT.getvalue())
        print(f"written {path}")


if __name__ == "__main__":
    main()
