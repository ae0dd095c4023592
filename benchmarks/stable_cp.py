"""Benchmark: CP-ALS-Sigma vs sensitivity-minimising CP (CPD-EPC, Sigma) under factor rounding.

    .venv/bin/python benchmarks/stable_cp.py            # full (a few minutes)
    .venv/bin/python benchmarks/stable_cp.py --quick    # one small case

Setting: a trained-like kernel (power-law spectrum + noise, ddtd.solvers.synthetic.structured_kernel)
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
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ddtd.solvers import cp_als  # noqa: E402
from ddtd.solvers.stable_cp import balance, sensitivity, stable_cp  # noqa: E402
from ddtd.solvers.synthetic import activation_sigma, structured_kernel  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--als-iter", type=int, default=200)
    ap.add_argument("--sweeps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log("command: .venv/bin/python benchmarks/stable_cp.py" + " ".join([""] + sys.argv[1:]))
    log(f"ddtd stable CP benchmark  torch {torch.__version__}  threads {args.threads}  "
        f"als-iter {args.als_iter}  sweeps {args.sweeps}")
    log("errors: relative squared Sigma error of the kernel rebuilt from the (rounded) factors")
    cases = [(32, 32, 48)] if args.quick else [(32, 32, 48), (64, 64, 96)]
    for T, S_, R in cases:
        run_case(T, S_, R, args)
    if not args.quick:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stable_cp.txt")
        with open(path, "w") as f:
            f.write(OUT.getvalue())
        print(f"written {path}")


if __name__ == "__main__":
    main()
