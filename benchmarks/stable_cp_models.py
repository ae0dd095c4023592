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
  gap f32          CP-ALS - stable, float32 accuracy (points); target <= 0.5
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
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from table import RESULTS, ROOT, _logits, method_config, quantized_accuracies, test_set  # noqa: E402

OUT = RESULTS / "stable_cp_models.jsonl"
METHODS = ("cp3", "cp3-stable")


def _key(r: dict) -> tuple:
    return (r["model"], r["method"], r["ratio_target"], r["seed"], r["max_iter"])


def _rows() -> list[dict]:
    return [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.exists() else []


def _store(row: dict, replace: bool) -> None:
    """Append ``row`` (one short write: runs for different models may share the file); with
    ``replace`` (``--redo``), rewrite the file atomically without the older rows of its key."""
    if not replace:
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    keep = [r for r in _rows() if _key(r) != _key(row)] + [row]
    tmp = OUT.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(OUT)


def run(args) -> None:
    from dataclasses import replace

    from ddtd.model_io import load_model
    from ddtd.pipeline import compress
    from train_reference import TRANSFORM, ensure

    RESULTS.mkdir(exist_ok=True)
    calib = ROOT / "calib" / "fmnist-512"
    if not calib.exists():
        sys.path.insert(0, str(ROOT / "calib"))
        from make_subset import build

        build("fashion-mnist", calib, 512, 0, "train")
    done = {_key(r) for r in _rows()}
    xt, yt = test_set()
    for name in args.models:
        model = load_model(ensure(name)["model"])
        base = int((_logits(model, xt).argmax(1) == yt).sum()) / len(xt)
        for ratio in args.ratios:
            for seed in args.seeds:
                for method in METHODS:
                    key = (name, method, ratio, seed, args.max_iter)
                    if key in done and not args.redo:
                        continue
                    base_method, cfg = method_config(method, "sigma", args.max_iter)
                    cfg = replace(cfg, seed=seed)
                    t = time.time()
                    res = compress(model, str(calib), ratio=ratio, method=base_method, norm="sigma", config=cfg,
                                   transform=TRANSFORM, batch_size=128, show_progress=False)
                    seconds = time.time() - t
                    z = _logits(res.model, xt)
                    row = {"model": name, "method": method, "ratio_target": ratio, "seed": seed,
                           "max_iter": args.max_iter, "threads": torch.get_num_threads(), "base_accuracy": base,
                           "accuracy": int((z.argmax(1) == yt).sum()) / len(xt), "ratio": res.report.ratio,
                           "sequential_layers": sum(1 for l in res.report.layers if l.note == "sequential"),
                           "seconds": seconds, "n_test": len(xt), "quantized_accuracy": quantized_accuracies(res.model, res.report, xt, yt, bits=(8, 6, 4))}
                    stab = [l.info for l in res.report.layers if "sensitivity_after" in l.info]
                    row["sensitivity"] = {"before": sum(i["sensitivity_before"] for i in stab),
                                          "after": sum(i["sensitivity_after"] for i in stab)}
                    print(json.dumps(row), flush=True)
                    _store(row, key in done)


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def summarize(rows: list[dict]) -> list[str]:
    """Markdown summary per (model, ratio, max_iter): means over the seeds both methods have."""
    lines = ["| model | ratio | seeds | CP-ALS f32 (sd) | stable f32 (sd) | gap f32 (sd) | int8 loss CP-ALS / stable "
             "| noise (1 se) CP-ALS / stable | flips r->w / w->r CP-ALS | flips r->w / w->r stable "
             "| sensitivity CP-ALS -> stable | f32 target | int8 target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["model"], r["ratio_target"], r["max_iter"]) for r in rows})
    for model, ratio, it in groups:
        by = {m: {r["seed"]: r for r in rows if (r["model"], r["ratio_target"], r["max_iter"], r["method"])
                  == (model, ratio, it, m)} for m in METHODS}
        seeds = sorted(set(by["cp3"]) & set(by["cp3-stable"]))
        if not seeds:
            continue
        cp = [by["cp3"][s] for s in seeds]
        st = [by["cp3-stable"][s] for s in seeds]

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
            f"| {model} | {ratio:g}x | {len(seeds)} ({it} it) | {a_cp:.2f} ({s_cp:.2f}) | {a_st:.2f} ({s_st:.2f}) | "
            f"{g:+.2f} ({gs:.2f}) | {l_cp:+.3f} / {l_st:+.3f} | {noise(cp):.3f} / {noise(st):.3f} | "
            f"{flips(cp, 'broke'):.2f} / {flips(cp, 'fixed'):.2f} | {flips(st, 'broke'):.2f} / {flips(st, 'fixed'):.2f} | "
            f"{ss_cp:.3g} -> {ss_st:.3g} | {f32_ok} | {int8_ok} |")
    extra = sorted({k for r in rows for k in r["quantized_accuracy"] if k.startswith("int") and "_" not in k
                    and k != "int8"}, key=lambda k: -int(k[3:]))
    if extra:
        lines += ["", "Coarser rounding (same models; one scale per output channel): accuracy loss against float32 "
                  "(points) and prediction flips (per cent), means over the seeds, CP-ALS / stable:", "",
                  "| model | ratio | seeds | " + " | ".join(f"{k} loss | {k} flips | {k} logit error" for k in extra)
                  + " |", "|---|---|---|" + "---|---|---|" * len(extra)]
        for model, ratio, it in groups:
            pair = []
            for m in METHODS:
                pair.append({r["seed"]: r for r in rows if (r["model"], r["ratio_target"], r["max_iter"], r["method"])
                             == (model, ratio, it, m)})
            seeds = sorted(set(pair[0]) & set(pair[1]))
            if not seeds:
                continue
            cells = []
            for k in extra:
                def mean(f, m):
                    vals = [f(pair[m][s]) for s in seeds if k in pair[m][s]["quantized_accuracy"]]
                    return sum(vals) / len(vals) if vals else float("nan")

                loss = [mean(lambda r: 100 * (r["accuracy"] - r["quantized_accuracy"][k]), m) for m in (0, 1)]
                fl = [mean(lambda r: 100 * r["quantized_accuracy"][f"{k}_flips"], m) for m in (0, 1)]
                le = [mean(lambda r: r["quantized_accuracy"][f"{k}_logit_error"], m) for m in (0, 1)]
                cells.append(f"{loss[0]:+.2f} / {loss[1]:+.2f} | {fl[0]:.2f} / {fl[1]:.2f} | {le[0]:.2g} / {le[1]:.2g}")
            lines.append(f"| {model} | {ratio:g}x | {len(seeds)} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    from ddtd.methods import MethodConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "vgg"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[8, 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--max-iter", type=int, default=MethodConfig().max_iter,
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
