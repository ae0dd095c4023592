"""What the sequential choice sees, and what the test set says, layer by layer (diagnostic).

    python benchmarks/sequential_probe.py vgg 16 8 cp3-stable      # model, ratio, CP-ALS seed, method

Compresses the reference model like ``benchmarks/stable_cp_models.py`` (default pipeline, 50
iterations, 1 thread) with ``ddtd.pipeline._choose_sequential`` wrapped: for every layer it
decides, the wrapper refits the two svd probes (on the original inputs / sequentially) and puts
each into a copy of the model being compressed (upstream layers already compressed, downstream
ones original), then prints one JSON line per layer: the decision and the layer-level
statistic ``z``; on the held-out quarter of the calibration images the logit error, the KL
divergence from the original model's softmax (``kl_z``: paired z, > 0 favours sequential) and
the top-1 agreement with the original model; and on the Fashion-MNIST test set the KL, logit
error and accuracy of each probe. The last line is the compressed model's test accuracy.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from table import accuracy, calibration_subset, method_config, test_set  # noqa: E402


def _batched(model, x, batch=500):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def _kl(ref, z):
    lr, lz = torch.log_softmax(ref, 1), torch.log_softmax(z, 1)
    return (lr.exp() * (lr - lz)).sum(1).double()


def main(argv=None) -> int:
    import ddtd.pipeline as P
    from ddtd.layers import replace_layer
    from ddtd.model_io import load_model
    from train_reference import TRANSFORM, ensure

    name, ratio, seed, method = (argv or sys.argv[1:])[:4]
    ratio, seed = float(ratio), int(seed)
    torch.set_num_threads(1)
    model = load_model(ensure(name)["model"]).eval()
    xt, yt = test_set()
    ref_test = _batched(P.prepare(model)[0], xt)
    decide = P._choose_sequential

    @torch.no_grad()
    def logged(p, layer, reference, work, fit_b, held_b, shapes, cfg, dev):
        use, info = decide(p, layer, reference, work, fit_b, held_b, shapes, cfg, dev)
        if not info:
            return use, info
        xs_f = P._capture_inputs(reference, p.name, fit_b, dev)
        xts_f = P._capture_inputs(work, p.name, fit_b, dev)
        r = P._probe_ranks(p, shapes[p.name])
        c_tt, c_xt, mu_x, mu_t, c_xx = P._cross_moments(layer, xs_f, xts_f, with_xx=True)
        fits = {"plain": P.solve(p.name, layer, "svd", r, cfg, c_xx.to(dev), mu_x.to(dev)),
                "seq": P.solve(p.name, layer, "svd", r, cfg, c_tt.to(dev), mu_t.to(dev),
                               target=P._regression_target(layer.weight.detach(), c_tt, c_xt),
                               mean_in=mu_x.to(dev))}
        ref_h = torch.cat([reference(x.to(dev)) for x in held_b])
        held, test = {}, {}
        for tag, out in fits.items():
            m = copy.deepcopy(work)
            replace_layer(m, p.name, "svd", out["factors"], out["bias"])
            zh = torch.cat([m(x.to(dev)) for x in held_b])
            held[tag] = {"mse": (zh - ref_h).pow(2).sum(1).double(), "kl": _kl(ref_h, zh),
                         "agree": float((zh.argmax(1) == ref_h.argmax(1)).double().mean())}
            zt = _batched(m, xt.to(dev)).cpu()
            test[tag] = {"kl": float(_kl(ref_test, zt).mean()), "mse": float((zt - ref_test).pow(2).sum(1).mean()),
                         "acc": float((zt.argmax(1) == yt).double().mean())}
        print(json.dumps({"layer": p.name, "sequential": bool(use), "z": info["heldout_error"]["z"],
                          "logit_z": P._paired_z(held["plain"]["mse"], held["seq"]["mse"]),
                          "kl_z": P._paired_z(held["plain"]["kl"], held["seq"]["kl"]),
                          "agree_plain": held["plain"]["agree"], "agree_seq": held["seq"]["agree"],
                          "test": test}), flush=True)
        return use, info

    P._choose_sequential = logged
    try:
        base, cfg = method_config(method, "sigma", 50)
        res = P.compress(model, str(calibration_subset()), ratio=ratio, method=base, norm="sigma",
                         config=replace(cfg, seed=seed), transform=TRANSFORM, batch_size=128,
                         show_progress=False)
    finally:
        P._choose_sequential = decide
    print(json.dumps({"accuracy": accuracy(res.model, xt, yt)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
