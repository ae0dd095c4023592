"""What the sequential choice sees, and what the test set says, layer by layer (diagnostic).

    python benchmarks/sequential_probe.py vgg 16 8 cp3-stable      # model, ratio, CP-ALS seed, method

Compresses the reference model like ``benchmarks/stable_cp_models.py`` (default pipeline, 50
iterations, 1 thread), collecting each layer's report row as it is fitted (``on_layer``). For
every layer whose sequential choice was made on held-out inputs (the row's
``info["heldout_error"]``), it then rebuilds the model as the pipeline had it at that choice
(upstream layers compressed, taken from the compressed model; downstream ones original),
refits the choice's two svd probes (on the original inputs / sequentially, with the public
functions of :mod:`ddtd.sequential` and :func:`ddtd.fitting.solve`) on the same calibration
inputs, puts each into a copy of that model, and prints one JSON line per layer: the decision
and the layer-level statistic ``z`` the pipeline recorded; on the held-out quarter of the
choice's calibration images the logit error, the KL divergence from the original model's
softmax (``kl_z``: paired z, > 0 favours sequential) and the top-1 agreement with the original
model; and on the Fashion-MNIST test set the KL, logit error and accuracy of each probe. The
last line is the compressed model's test accuracy.

The choice's inputs are rebuilt as ``ddtd.compress`` reads them: the calibration images less
the seeded fidelity hold-out (``CalibrationConfig.holdout``, :func:`ddtd.inputs.split_batches`),
of which the first ``ddtd.sequential.SEQUENTIAL_IMAGES`` are split by
:func:`ddtd.sequential.split_holdout`. As a
check, :func:`ddtd.sequential.decide` is rerun on the rebuilt model and inputs; a layer whose
``z`` differs from the recorded one is reported on stderr (its line would then not describe
the pipeline's choice). The probe ranks are those the choice uses for the planned method and
ranks (:func:`ddtd.planning.svd_ranks_at_size`); with ``auto``, the svd rank the plan allocated,
recovered from the winning format's ranks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from table import accuracy, calibration_subset, test_set  # noqa: E402

#: The seed offset of ``ddtd.compress``'s fidelity hold-out (``calibration.seed + 7919``).
FIDELITY_SEED_OFFSET = 7919


def _batched(model, x, batch=500):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def _kl(ref, z):
    lr, lz = torch.log_softmax(ref, 1), torch.log_softmax(z, 1)
    return (lr.exp() * (lr - lz)).sum(1).double()


def choice_inputs(model, data, cal) -> tuple[list, list | None]:
    """``(fit, held)`` batches the sequential choice of ``ddtd.compress(model, data, config)``
    worked on (``cal``: ``config.calibration``): the inputs fitted on (with 16 or more, the
    fidelity hold-out, a seeded random share, removed), their first ``SEQUENTIAL_IMAGES`` split
    into three quarters to fit and a held-out quarter (:func:`ddtd.sequential.split_holdout`)."""
    from ddtd.calibration.run import default_batch_size, image_transform, input_batches
    from ddtd.inputs import count, first_samples, rebatch, split_batches, to_device
    from ddtd.sequential import SEQUENTIAL_IMAGES, split_holdout

    transform = image_transform(model, data, cal.transform)
    bs = cal.batch_size or default_batch_size(data, transform)
    it, _, _ = input_batches(data, transform, cal, bs, model=model)
    batches = [to_device(b, "cpu") for b in it]
    if cal.holdout and count(batches) >= 16:
        kept, _ = split_batches(batches, cal.holdout, cal.seed + FIDELITY_SEED_OFFSET)
        batches = rebatch(kept, bs)
    return split_holdout(rebatch(first_samples(batches, SEQUENTIAL_IMAGES), bs), bs)


def _probe_ranks(row, layer, macs: dict, auto: bool):
    """The svd ranks of the choice's probe for a fitted layer's row: the planned method's
    ranks carried to the svd format (:func:`ddtd.planning.svd_ranks_at_size`). ``auto`` plans
    an svd rank and fits every candidate at that size: the largest svd rank that gives the
    winner its ranks (:func:`ddtd.planning.ranks_for_format`)."""
    from ddtd.errors import InputError
    from ddtd.planning import layer_shape, ranks_for_format, svd_ranks_at_size

    shape = layer_shape(layer, macs.get(row.name, layer.weight.numel()))
    ranks = tuple(row.ranks) if isinstance(row.ranks, list) else row.ranks
    if auto:
        def fits(r):
            try:
                got = ranks_for_format(row.method, shape, r)
            except InputError:
                return False
            return (tuple(got) if isinstance(got, (list, tuple)) else got) == ranks

        hits = [r for r in range(1, min(shape.T // shape.groups, shape.S * shape.kh * shape.kw) + 1) if fits(r)]
        if hits:
            return hits[-1]
    return svd_ranks_at_size(row.method, ranks, shape)


def _same_z(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


@torch.no_grad()
def probe_layers(model, data, config, result, rows, xt, yt, device="cpu"):
    """One dict per layer whose sequential choice was made on held-out inputs (see the module
    docstring): ``result`` is ``ddtd.compress(model, data, config)``, ``rows`` its report rows
    in the order they were fitted (the ``on_layer`` calls), ``(xt, yt)`` the test set."""
    from ddtd.fitting import LayerData, solve
    from ddtd.inputs import Feed, probe_input
    from ddtd.layers import get_module, macs_by_layer, replace_layer, set_module
    from ddtd.methods import AutoConfig, SvdConfig
    from ddtd.pipeline import prepare
    from ddtd.sequential import capture, cross_moments, decide, paired_z, regression_target

    dev = torch.device(device)
    feed = Feed(dev, config.calibration.forward, config.calibration.mask)
    reference = prepare(model)[0].to(dev)
    ref_test = _batched(reference, xt.to(dev)).cpu()
    work = copy.deepcopy(reference)  # the model as the pipeline had it at each layer, rebuilt row by row
    fit_b, held_b = choice_inputs(model, data, config.calibration)
    macs = macs_by_layer(reference, probe_input(result.report.settings["input_shape"]))
    auto = isinstance(config.method, AutoConfig)
    for row in rows:
        recorded = row.info.get("heldout_error")
        if recorded is not None and held_b is not None:
            name = row.name
            layer = get_module(work, name)
            r = _probe_ranks(row, layer, macs, auto)
            check = decide(name, layer, (reference, work), (fit_b, held_b), r, feed)
            z = check.info.get("heldout_error", {}).get("z")
            if z is None or not _same_z(z, recorded["z"]):
                print(f"warning: {name}: the rebuilt choice gives z = {z}, the pipeline recorded "
                      f"{recorded['z']}: this line does not describe the pipeline's choice", file=sys.stderr)
            xs_f = capture(reference, name, fit_b, feed)
            xts_f = capture(work, name, fit_b, feed)
            c_tt, c_xt, mu_x, mu_t, c_xx = cross_moments(layer, xs_f, xts_f, with_xx=True)
            del xs_f, xts_f
            cfg = SvdConfig()
            fits = {"plain": solve(layer, cfg, r, LayerData(c_xx.to(dev), mu_x.to(dev)), name=name),
                    "seq": solve(layer, cfg, r, LayerData(c_tt.to(dev), mu_t.to(dev),
                                                         target=regression_target(layer.weight.detach(), c_tt, c_xt),
                                                         mean_in=mu_x.to(dev)), name=name)}
            ref_h = torch.cat([reference(x.to(dev)) for x in held_b])
            held, test = {}, {}
            for tag, fit in fits.items():
                m = copy.deepcopy(work)
                replace_layer(m, name, "svd", fit.factors, fit.bias)
                zh = torch.cat([m(x.to(dev)) for x in held_b])
                held[tag] = {"mse": (zh - ref_h).pow(2).sum(1).double(), "kl": _kl(ref_h, zh),
                             "agree": float((zh.argmax(1) == ref_h.argmax(1)).double().mean())}
                zt = _batched(m, xt.to(dev)).cpu()
                test[tag] = {"kl": float(_kl(ref_test, zt).mean()), "mse": float((zt - ref_test).pow(2).sum(1).mean()),
                             "acc": float((zt.argmax(1) == yt).double().mean())}
                del m
            yield {"layer": name, "sequential": row.note == "sequential", "z": recorded["z"],
                   "logit_z": paired_z(held["plain"]["mse"], held["seq"]["mse"]),
                   "kl_z": paired_z(held["plain"]["kl"], held["seq"]["kl"]),
                   "agree_plain": held["plain"]["agree"], "agree_seq": held["seq"]["agree"],
                   "test": test}
        if row.method != "dense":  # the pipeline swaps each fitted layer in before the next one
            set_module(work, row.name, copy.deepcopy(get_module(result.model, row.name)).to(dev))


def main(argv=None) -> int:
    from ddtd.pipeline import compress
    from ddtd.model_io import load_model
    from stable_cp_models import compress_config
    from train_reference import ensure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="reference model name (examples/train_reference.py), e.g. vgg")
    ap.add_argument("ratio", type=float, help="whole-model compression ratio, e.g. 16")
    ap.add_argument("seed", type=int, help="CP-ALS (solver) seed, e.g. 8")
    ap.add_argument("method", help="method name of benchmarks/table.py, e.g. cp3-stable")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(ensure(args.model)["model"]).eval()
    xt, yt = test_set()
    data = str(calibration_subset())
    config = compress_config(args.method, args.ratio, args.seed, 50)
    rows = []
    res = compress(model, data, config, on_layer=rows.append)
    for line in probe_layers(model, data, config, res, rows, xt, yt):
        print(json.dumps(line), flush=True)
    print(json.dumps({"accuracy": accuracy(res.model, xt, yt)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
