"""Benchmark of ddtd.solvers: numerics on a real layer, and speed against tensorly.

    .venv/bin/python benchmarks/solvers.py            # both sections (a few minutes)
    .venv/bin/python benchmarks/solvers.py --section numerics
    .venv/bin/python benchmarks/solvers.py --section speed [--quick]

**Numerics** (``--section numerics``).  The layer is torchvision's ResNet-18 ``layer3.1.conv2``
(256 -> 256, 3x3; torchvision's initialisation, no pretrained weights: nothing is downloaded)
and Sigma the uncentred second moment of its unfolded input over 64 random crops (224 x 224)
of the natural images bundled with scikit-image (``skimage.data``; smooth random images if
scikit-image is missing).  Each solver runs on float32 inputs (default compute dtype, float32)
and on float64 inputs with ``dtype=torch.float64``.  Columns: ``reported`` = the last entry of
the solver's history, ``recomputed`` = ``trace(dW S dW^T) / trace(W S W^T)`` with ``W~`` rebuilt
in float64 from the returned factors by this script and ``S = Sigma + damping * mean(diag) * I``
(the solver's objective), ``rel diff`` = ``|reported - recomputed| / recomputed``, ``|W~|/|W|``
and ``fro err`` = ``||W - W~||_F / ||W||_F`` from the same rebuild.  Rows with damping 0 show the
bare Sigma fit (singular Sigma: D = 2304 > rank).

**Speed** (``--section speed``): ddtd against tensorly (pytorch backend), side by side in one
run.  Full: (256,256,3,3) R=128, (512,512,3,3) R=256, Tucker2 (128,128) on (512,512,3,3);
``--quick``: smaller sizes.  Sigma: centred covariance of unfolded 3x3 patches of ReLU
activations (random conv on channel- and space-correlated Gaussian images,
tests/synthetic.py), i.e. a realistic, strongly anisotropic, non-Kronecker covariance.
Kernel: power-law singular spectrum + noise.  Every method runs the same number of iterations;
"s/it" is wall time / iterations (all setup and init included).  Errors are relative squared
errors: "fro" = ||K - K~||^2 / ||K||^2, "sigma" = tr(dW Sigma dW^T) / tr(W Sigma W^T); the ddtd
Sigma rows fit this undamped Sigma (``damping=0``) so that the errors compare.  "to-eq s" = ddtd wall time
until its error (in its own norm) first reached tensorly's final error in that norm, estimated
as total time * (iterations needed / iterations run), setup included (equal-error comparison).
GFLOP/s counts the large products of ddtd's algorithms (model in `flops_*`), against the
float32 matmul peak measured at the start of the run.  The machine is shared: compare ratios
within one run.

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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the synthetic layers of the tests

import ddtd.solvers._common as common  # noqa: E402
import ddtd.solvers.cp as cpmod  # noqa: E402
tkmod = sys.modules["ddtd.solvers.tucker2"]
from ddtd.solvers import cp_als, lowrank_sparse, sigma_svd, stable_cp, tucker2  # noqa: E402
from synthetic import activation_images, activation_sigma, structured_kernel  # noqa: E402

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
        res = cp_als(K, Sig32, R, layout=layout, max_iter=iters, tol=0, damping=0.0)
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
    res = tucker2(K, Sig.float(), (R1, R2), max_iter=iters, tol=1e-5, damping=0.0)
    total = time.perf_counter() - t
    row("ddtd tucker2 Sigma (whitened init)", res.n_iter, total, *errs(K, res.kernel(), Sig),
        flops_tucker_sigma(T, S, 9, R1, R2, res.n_iter, CG_STEPS[0]), peak,
        ref=tl_s * res.n_iter / iters, to_eq=time_to(res.raw_history, tl_e[1], total))
    log(f"      ({CG_STEPS[0]} CG steps; converged={res.converged}; wall incl. setup {total:.1f} s)")


# ---------------------------------------------------------------------------- numerics

F64 = torch.float64


def bench_tt(T, S, R, iters, tl):
    """TT rows: tensorly's ``tensor_train`` / ``tensor_train_matrix`` against ddtd's TT-SVD at
    equal ranks (Frobenius), then ddtd's ALS in Frobenius and TT-ALS-Sigma."""
    from tensorly.decomposition import tensor_train, tensor_train_matrix

    from ddtd.solvers import tt_conv, tt_full, tt_matrix, tt_matrix_svd, tt_svd
    from ddtd.solvers.formats import tt_matrix_modes

    K = structured_kernel(T, S, 3, seed=1)
    D = S * 9
    Sig = activation_sigma(S, 3, n_images=max(32, (3 * D) // 196 + 1), size=14, seed=0)
    log(f"\nTT convolution: kernel ({T}, {S}, 3, 3), ranks ({R}, {R}, {R}); Sigma {D}x{D} from activations")
    header()
    X = K.permute(1, 2, 3, 0).contiguous()                 # (s, y, x, t): the TT-conv order
    t = time.perf_counter()
    cores = tensor_train(X.double(), rank=[1, R, R, R, 1])
    tl_s = time.perf_counter() - t
    Kh = torch.einsum("asb,byc,cxd,dte->tsyx", *[c for c in cores])
    row("tensorly tensor_train", 1, tl_s, *errs(K, Kh, Sig))
    t = time.perf_counter()
    ours = tt_svd(X, R)
    s = time.perf_counter() - t
    row("ddtd tt_svd", 1, s, *errs(K, torch.einsum("asb,byc,cxd,dte->tsyx", *ours), Sig), ref=tl_s)
    for name, sg in (("ddtd tt_conv frobenius (ALS)", None), ("ddtd tt_conv sigma (TT-ALS-Sigma)", Sig)):
        t = time.perf_counter()
        r = tt_conv(K, sg, R, max_iter=iters)
        row(name, r.n_iter, time.perf_counter() - t, *errs(K, r.kernel(), Sig))
    W = K[:, :, 1, 1].contiguous()                          # a (T, S) matrix, as a 1x1 conv
    Sm = Sig.reshape(S, 9, S, 9)[:, 4, :, 4].contiguous()
    om, im = tt_matrix_modes(T, S)
    log(f"\nTT-matrix: ({T} x {S}) = {om} x {im}, ranks ({R // 4}, {R // 4}); Sigma: the centre tap's")
    header()
    t = time.perf_counter()
    ct = tensor_train_matrix(W.double().reshape(*om, *im), [1, R // 4, R // 4, 1])
    tl_s = time.perf_counter() - t
    Wt = tl.tt_matrix_to_tensor(ct).reshape(T, S)
    row("tensorly tensor_train_matrix", 1, tl_s, *errs(W, Wt, Sm))
    t = time.perf_counter()
    Wo = tt_full(tt_matrix_svd(W, om, im, R // 4))
    row("ddtd tt_matrix_svd", 1, time.perf_counter() - t, *errs(W, Wo, Sm), ref=tl_s)
    for name, sg in (("ddtd tt_matrix frobenius (ALS)", None), ("ddtd tt_matrix sigma (TT-ALS-Sigma)", Sm)):
        t = time.perf_counter()
        r = tt_matrix(W, sg, R // 4, max_iter=iters)
        row(name, r.n_iter, time.perf_counter() - t, *errs(W, r.matrix(), Sm))


def natural_crops(n: int, size: int, seed: int) -> tuple[torch.Tensor, str]:
    """``(n, 3, size, size)`` ImageNet-normalised random crops of scikit-image's bundled colour
    photographs (random scale 0.35-1 of the shorter side, random horizontal flip)."""
    g = torch.Generator().manual_seed(seed)
    try:
        import skimage.data as sd
        names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina"]
        imgs = [torch.from_numpy(getattr(sd, nm)()[..., :3].copy()).permute(2, 0, 1).float() / 255
                for nm in names]
        src = "skimage.data: " + ", ".join(names)
    except ImportError:
        imgs = list(activation_images(3, 8, 2 * size, seed=seed))
        imgs = [(x - x.min()) / (x.max() - x.min() + 1e-12) for x in imgs]
        src = "smooth random images (scikit-image not installed)"
    out = []
    for i in range(n):
        im = imgs[i % len(imgs)]
        h, w = im.shape[1:]
        side = int(min(h, w) * (0.35 + 0.65 * float(torch.rand(1, generator=g))))
        y = int(torch.randint(0, h - side + 1, (1,), generator=g))
        x = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = im[:, y:y + side, x:x + side][None]
        c = torch.nn.functional.interpolate(c, size=(size, size), mode="bilinear",
                                            align_corners=False, antialias=True)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            c = c.flip(-1)
        out.append(c)
    x = torch.stack(out)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std, src


def resnet_layer_sigma(n_images: int = 64, seed: int = 0):
    """``(weight (256, 256, 3, 3) float64, Sigma (2304, 2304) float64, note)`` of torchvision's
    ResNet-18 ``layer3.1.conv2`` (torchvision initialisation, seed ``seed``)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    layer = model.layer3[1].conv2
    x, src = natural_crops(n_images, 224, seed)
    acc, count = [], [0]
    D = layer.in_channels * 9

    def hook(mod, inp):
        cols = torch.nn.functional.unfold(inp[0], 3, padding=1)       # (n, D, L)
        X = cols.permute(0, 2, 1).reshape(-1, D).double()
        acc.append(X.T @ X)
        count[0] += X.shape[0]

    h = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        for i in range(0, n_images, 16):
            model(x[i:i + 16])
    h.remove()
    sigma = sum(acc) / count[0]
    sigma = 0.5 * (sigma + sigma.T)
    note = (f"torchvision resnet18 (random init, seed {seed}) layer3.1.conv2, uncentred Sigma of "
            f"{count[0]} input patches from {n_images} crops of {src}")
    return layer.weight.detach().double(), sigma, note


def rebuild64(res) -> torch.Tensor:
    """``W~ (T, D)`` in float64 from a result's factors (independent of the result's methods)."""
    kind = type(res).__name__
    if kind == "SVDResult":
        return res.A.double() @ res.B.double()
    if kind == "Tucker2Result":
        return torch.einsum("ta,abij,sb->tsij", res.U.double(), res.core.double(),
                            res.V.double()).reshape(res.U.shape[0], -1)
    if kind in ("CPResult", "StableCPResult"):
        A, B, C = res.A.double(), res.B.double(), res.C.double()
        if res.layout == "cp3":
            return torch.einsum("tr,sr,pr->tsp", A, B, C).reshape(A.shape[0], -1)
        return torch.einsum("tr,sr,ir,jr->tsij", A, B, C, res.E.double()).reshape(A.shape[0], -1)
    if kind == "LRSResult":
        A, B = (f.double() for f in res.factors)
        out = A @ B
        i, v = res.indices, res.values.double()
        if res.mode == "additive":
            out[i[:, 0], i[:, 1]] += v
        else:
            out[i[:, 0], i[:, 1]] = v
        return out
    raise TypeError(kind)


def recomputed(W64, What, sigma64, damping):
    S = sigma64 + damping * float(torch.diagonal(sigma64).mean()) * torch.eye(
        sigma64.shape[0], dtype=F64)
    W = W64.reshape(W64.shape[0], -1)
    dW = W - What
    rel = float(((dW @ S) * dW).sum() / ((W @ S) * W).sum())
    return rel, float(What.norm() / W.norm()), float(dW.norm() / W.norm())


def bench_numerics(n_images: int, seed: int):
    t = time.perf_counter()
    W64, S64, note = resnet_layer_sigma(n_images, seed)
    ev = torch.linalg.eigvalsh(S64)
    log(f"\nNumerics: {note} (built in {time.perf_counter() - t:.1f} s)")
    log(f"  weight {tuple(W64.shape)}, Sigma {tuple(S64.shape)}: eigenvalues max {float(ev[-1]):.3g}, "
        f"median {float(ev[len(ev) // 2]):.3g}, min {float(ev[0]):.3g}; "
        f"{int((ev > 1e-10 * ev[-1]).sum())} above 1e-10 max")
    cases = [
        ("svd r=128", lambda W, S, **k: sigma_svd(W, S, 128, **k), "svd"),
        ("tucker2 (128,128) 10 it", lambda W, S, **k: tucker2(W, S, (128, 128), max_iter=10, **k), "tucker2"),
        ("cp3 R=128 10 it", lambda W, S, **k: cp_als(W, S, 128, layout="cp3", max_iter=10, **k), "cp3"),
        ("cp4 R=128 10 it", lambda W, S, **k: cp_als(W, S, 128, layout="cp4", max_iter=10, **k), "cp4"),
        ("stable cp3 R=128 (cp3 row start) 3 sw", None, "cp3-stable"),
        ("lrs r=64 + 32768 nz, 5 rounds", lambda W, S, **k: lowrank_sparse(
            W.reshape(256, -1), S, 64, 32768, init="data", max_iter=5, **k), "lrs"),
    ]
    header_ = (f"  {'solver':<36} {'inputs':<8} {'damping':>7} {'it':>3} {'s':>6} {'reported':>11} "
               f"{'recomputed':>11} {'rel diff':>8} {'|W~|/|W|':>8} {'fro err':>7}")
    log(header_)
    from ddtd.solvers import default_damping

    cp3_fits = {}

    def run(label, fn, method, damping):
        starts = {}
        for inputs in ("float32", "float64"):
            W = W64.float() if inputs == "float32" else W64
            S = S64.float() if inputs == "float32" else S64
            kw = {"damping": damping} if inputs == "float32" else {"damping": damping, "dtype": F64}
            t = time.perf_counter()
            if fn is None:        # stable CP from the cp3 row's fit of the same inputs
                res = stable_cp(W, S, 128, layout="cp3", init=cp3_fits[inputs, damping],
                                max_sweeps=3, **kw)
            else:
                res = fn(W, S, **kw)
            secs = time.perf_counter() - t
            if method == "cp3":
                cp3_fits[inputs, damping] = res
            rel, ratio, fro = recomputed(W.double(), rebuild64(res), S.double(), damping)
            rep = res.history[-1]
            it = getattr(res, "n_iter", 1)
            log(f"  {label:<36} {inputs:<8} {damping:>7g} {it:>3} {secs:6.1f} {rep:11.7f} "
                f"{rel:11.7f} {abs(rep - rel) / rel:8.1e} {ratio:8.3f} {fro:7.4f}")
            starts[inputs] = rebuild64(res)
        d = starts["float32"] - starts["float64"]
        Sd = S64 + damping * float(torch.diagonal(S64).mean()) * torch.eye(S64.shape[0], dtype=F64)
        W = W64.reshape(256, -1)
        gap = float(((d @ Sd) * d).sum() / ((W @ Sd) * W).sum()) ** 0.5
        log(f"  {'':<36} float32 vs float64 fits: ||W~32 - W~64||_S / ||W||_S = {gap:.2e}")

    for label, fn, method in cases:
        run(label, fn, method, default_damping(method))
    for label, fn, method in cases[1:3]:
        run(label, fn, method, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=("all", "numerics", "speed"), default="all")
    ap.add_argument("--quick", action="store_true", help="speed section: small sizes")
    ap.add_argument("--iters", type=int, default=None, help="CP iterations (default 10; quick 10)")
    ap.add_argument("--images", type=int, default=64, help="numerics: crops for Sigma")
    ap.add_argument("--seed", type=int, default=0, help="numerics: model init and crops")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "solvers.txt"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice). Use 1 when another process "
                    "keeps a core busy: OpenMP with more threads than free cores stalls")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    iters = args.iters or 10
    peak = matmul_peak()
    log("command: .venv/bin/python benchmarks/solvers.py " + " ".join(sys.argv[1:]))
    log(f"ddtd solver benchmark  torch {torch.__version__}  threads {torch.get_num_threads()}")
    log(f"float32 matmul peak (4096^3): {peak:.1f} GFLOP/s;  load average: "
        f"{os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    if args.section in ("all", "numerics"):
        bench_numerics(args.images, args.seed)
    if args.section in ("all", "speed"):
        import tensorly as tl
        tl.set_backend("pytorch")
        warnings.filterwarnings("ignore", category=UserWarning, module="tensorly")
        log(f"\nSpeed against tensorly {tl.__version__} (pytorch backend)")
        log("columns: it = iterations; tl/this = tensorly (parafac random init / partial_tucker) "
            "s/it divided by this s/it (higher = faster than tensorly); to-eq s = seconds until "
            "ddtd's error in its own norm (Frobenius rows: fro, Sigma rows: sigma) first reached "
            "tensorly's best final error in that norm")
        if args.quick:
            bench_cp(128, 128, 64, iters, peak, tl)
            bench_tucker(256, 256, 64, 64, 20, peak)
            bench_tt(128, 128, 32, 10, tl)
        else:
            bench_tt(256, 256, 64, 20, tl)
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
