"""CP-ALS-Sigma against stable CP (Sigma) on whole models, over several CP-ALS seeds.

    python benchmarks/stable_cp_models.py                                  # resnet18 + vgg, 8x 16x, seeds 0 1 2
    python benchmarks/stable_cp_models.py --models vgg --ratios 16 --seeds 0 1 2 3 4 --threads 1
    python benchmarks/stable_cp_models.py --render                         # only the summary

Why seeds: without fine-tuning, one compressed model's accuracy moves by a point or two with
anything that changes the CP-ALS solution (its random start, the iteration count, float
rounding through the thread count), so one row per method cannot tell a 0.5-point gap from
chance. Every (model, ratio, seed) here compresses the model twice with the default pipeline
(global allocation, default sequential choice): ``cp3`` (CP-ALS-Sigma) and ``cp3-stable``
(CPD-EPC started from the CP-ALS solution of the same seed, at its Sigma error), and measures on
the full Fashion-MNIST test set the accuracy with the factor weights in float32, float16 and
int8 (symmetric, one scale per output channel of every factor conv), the int8 prediction flips
against the same model in float32 (split into right -> wrong and wrong -> right) and the summed
sensitivity. Rows go to ``benchmarks/results/stable_cp_models.jsonl`` (a re-run skips rows
already there unless ``--redo``); the summary to ``benchmarks/results/stable_cp_models.md``.

Summary per (model, ratio), means over the seeds both methods have:
  gap f32          CP-ALS - stable, float32 accuracy (points); target <= 0.5; with its standard
                   deviation over seeds and the standard error of the mean (sd / sqrt(seeds))
  int8 loss        float32 - int8 accuracy of each model (points); target: stable <= CP-ALS / 2
                   (a CP-ALS gain counts as zero loss: stable must then lose nothing)
  +- (sd)          standard deviation over seeds
  flips r->w/w->r  right -> wrong and wrong -> right predictions under int8 (per cent)
The int8 loss of one model is (right->wrong - wrong->right) / N; when nothing but rounding noise
acts, the two counts are equal in expectation and the loss has a standard error of about
sqrt(flips) / N, given in the summary (``noise``) next to the measured losses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from table import (RESULTS, _store_row, accuracy, calibration_subset, method_config,  # noqa: E402
                   quantized_accuracies, sensitivity_totals, test_set)

OUT = RESULTS / "stable_cp_models.jsonl"
METHODS = ("cp3", "cp3-stable")  # the default pair; --methods adds variants (cp3-stable-refit)


def _key(r: dict) -> tuple:
    return (r["model"], r["method"], r["ratio_target"], r["seed"], r["max_iter"])


def _rows() -> list[dict]:
    return [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.exists() else []


def compress_config(method: str, ratio: float, seed: int, max_iter: int):
    """The default pipeline's config for one table method at ``ratio``, CP-ALS seed ``seed``."""
    from ddtd.config import CalibrationConfig, CompressConfig, Size
    from ddtd.methods import with_settings
    from train_reference import TRANSFORM

    return CompressConfig(method=with_settings(method_config(method, max_iter), seed=seed), size=Size(ratio=ratio),
                          norm="sigma",
                          calibration=CalibrationConfig(transform=TRANSFORM, batch_size=128, show_progress=False))


def run(args) -> None:
    from ddtd.model_io import load_model
    from ddtd.pipeline import compress
    from train_reference import ensure

    RESULTS.mkdir(exist_ok=True)
    calib = calibration_subset()
    done = {_key(r) for r in _rows()}
    xt, yt = test_set()
    for name in args.models:
        model = load_model(ensure(name)["model"])
        base = accuracy(model, xt, yt)
        for ratio in args.ratios:
            for seed in args.seeds:
                for method in args.methods:
                    key = (name, method, ratio, seed, args.max_iter)
                    if key in done and not args.redo:
                        continue
                    config = compress_config(method, ratio, seed, args.max_iter)
                    t = time.time()
                    res = compress(model, str(calib), config)
                    seconds = time.time() - t
                    row = {"model": name, "method": method, "ratio_target": ratio, "seed": seed,
                           "max_iter": args.max_iter, "threads": torch.get_num_threads(), "base_accuracy": base,
                           "accuracy": accuracy(res.model, xt, yt), "ratio": res.report.ratio,
                           "sequential_layers": sum(1 for l in res.report.layers if l.note == "sequential"),
                           "seconds": seconds, "n_test": len(xt),
                           "quantized_accuracy": quantized_accuracies(res.model, res.report, xt, yt, bits=(8, 6, 4)),
                           "sensitivity": sensitivity_totals(res.report)}
                    print(json.dumps(row), flush=True)
                    _store_row(OUT, row, key if key in done else None, key=_key)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def _paired(rows: list[dict], model, ratio, it, stable: str = "cp3-stable") -> tuple[list[dict], list[dict]]:
    """The CP-ALS and ``stable`` rows of one (model, ratio, max_iter), for the seeds both have, in seed order."""
    by = [{r["seed"]: r for r in rows if (r["model"], r["ratio_target"], r["max_iter"], r["method"])
           == (model, ratio, it, m)} for m in ("cp3", stable)]
    seeds = sorted(set(by[0]) & set(by[1]))
    return [by[0][s] for s in seeds], [by[1][s] for s in seeds]


def _variants(rows: list[dict]) -> list[str]:
    """The stable methods in the rows: ``cp3-stable`` first, then the variants."""
    found = {r["method"] for r in rows} - {"cp3"}
    return sorted(found, key=lambda m: (m != "cp3-stable", m))


def summarize(rows: list[dict]) -> list[str]:
    """Markdown summary per (model, ratio, max_iter): means over the seeds both methods have."""
    lines = ["| model | ratio | stable method | seeds | CP-ALS f32 (sd) | stable f32 (sd) | gap f32 (sd; se) | int8 loss CP-ALS / stable "
             "| noise (1 se) CP-ALS / stable | flips r->w / w->r CP-ALS | flips r->w / w->r stable "
             "| sensitivity CP-ALS -> stable | f32 target | int8 target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["model"], r["ratio_target"], r["max_iter"]) for r in rows})
    for (model, ratio, it), variant in [(g, v) for g in groups for v in _variants(rows)]:
        cp, st = _paired(rows, model, ratio, it, variant)
        if not cp:
            continue

        def acc(rs):
            return [100 * r["accuracy"] for r in rs]

        def loss(rs):
            return [100 * (r["accuracy"] - r["quantized_accuracy"]["int8"]) for r in rs]

        def flips(rs, k):
            return sum(100 * r["quantized_accuracy"].get(f"int8_{k}", float("nan")) for r in rs) / len(rs)

        def noise(rs):  # standard error of the mean int8 loss under pure rounding noise
            n = [r["n_test"] for r in rs]
            return 100 * math.sqrt(sum(r["quantized_accuracy"]["int8_flips"] * k for r, k in zip(rs, n))) / sum(n)

        (a_cp, s_cp), (a_st, s_st) = _mean_sd(acc(cp)), _mean_sd(acc(st))
        g, gs = _mean_sd([a - b for a, b in zip(acc(cp), acc(st))])
        l_cp, l_st = _mean_sd(loss(cp))[0], _mean_sd(loss(st))[0]
        ss_cp = sum(r["sensitivity"]["after"] for r in cp) / len(cp)
        ss_st = sum(r["sensitivity"]["after"] for r in st) / len(st)
        f32_ok = "met" if g <= 0.5 else "not met"
        int8_ok = "met" if l_st <= max(l_cp, 0.0) / 2 else "not met"
        lines.append(
            f"| {model} | {ratio:g}x | {variant} | {len(cp)} ({it} it) | {a_cp:.2f} ({s_cp:.2f}) | {a_st:.2f} ({s_st:.2f}) | "
            f"{g:+.2f} ({gs:.2f}; {gs / math.sqrt(len(cp)):.2f}) | {l_cp:+.3f} / {l_st:+.3f} | {noise(cp):.3f} / {noise(st):.3f} | "
            f"{flips(cp, 'broke'):.2f} / {flips(cp, 'fixed'):.2f} | {flips(st, 'broke'):.2f} / {flips(st, 'fixed'):.2f} | "
            f"{ss_cp:.3g} -> {ss_st:.3g} | {f32_ok} | {int8_ok} |")
    extra = sorted({k for r in rows for k in r["quantized_accuracy"] if k.startswith("int") and "_" not in k
                    and k != "int8"}, key=lambda k: -int(k[3:]))
    if extra:
        lines += ["", "Coarser rounding (same models; one scale per output channel): accuracy loss against float32 "
                  "(points) and prediction flips (per cent), means over the seeds, CP-ALS / stable:", "",
                  "| model | ratio | stable method | seeds | " + " | ".join(f"{k} loss | {k} flips | {k} logit error" for k in extra)
                  + " |", "|---|---|---|---|" + "---|---|---|" * len(extra)]
        for (model, ratio, it), variant in [(g, v) for g in groups for v in _variants(rows)]:
            pair = _paired(rows, model, ratio, it, variant)
            if not pair[0]:
                continue
            cells = []
            for k in extra:
                def mean(f, rs):
                    vals = [f(r) for r in rs if k in r["quantized_accuracy"]]
                    return sum(vals) / len(vals) if vals else float("nan")

                loss = [mean(lambda r: 100 * (r["accuracy"] - r["quantized_accuracy"][k]), rs) for rs in pair]
                fl = [mean(lambda r: 100 * r["quantized_accuracy"][f"{k}_flips"], rs) for rs in pair]
                le = [mean(lambda r: r["quantized_accuracy"][f"{k}_logit_error"], rs) for rs in pair]
                cells.append(f"{loss[0]:+.2f} / {loss[1]:+.2f} | {fl[0]:.2f} / {fl[1]:.2f} | {le[0]:.2g} / {le[1]:.2g}")
            lines.append(f"| {model} | {ratio:g}x | {variant} | {len(pair[0])} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    from ddtd.methods import default_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[8, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="cp3 and stable CP variants (cp3-stable, cp3-stable-refit); the summary "
                         "compares each stable variant with cp3 on the seeds both have")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--max-iter", type=int, default=default_config("cp3").max_iter,
                    help="CP-ALS iterations (default: ddtd's default, what `ddtd compress` runs; "
                         "the results table uses 25)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the results file")
    ap.add_argument("--render", action="store_true", help="only print the summary")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.render:
        run(args)
    lines = summarize(_rows())
    (RESULTS / "stable_cp_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
