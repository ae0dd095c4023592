"""Allocation rules and norms side by side on a real pretrained network, with Sigma-SVD fits.

One calibration and one sensitivity pass; then, for each whole-model ratio, every layer is
replaced by its Sigma-SVD (or Frobenius SVD) truncation at the rank each allocation gives it
(:class:`ddtd.fidelity.SvdProbe`: exactly ``--method svd --no-sequential``'s fit, as a dense
weight), and the model is scored on evaluation photos no fit has seen: top-1 agreement with the
original and relative logit error. Rows:

* ``sigma + sensitivity``: Sigma norm, layer errors weighted by their effect on the output (default);
* ``sigma + relative``: Sigma norm, layer errors relative to each layer's output energy;
* ``frobenius``: weights only (no data, no bias correction): a hand-rolled SVD.

    python benchmarks/allocation.py --ratios 1.1 1.25 1.5 2 --out benchmarks/results/allocation.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddtd.calibration import calibrate  # noqa: E402
from ddtd.calibration.collector import select_layers  # noqa: E402
from ddtd.config import CalibrationConfig, CompressConfig, Size  # noqa: E402
from ddtd.data import ImageFolder, ImageTransform  # noqa: E402
from ddtd.fidelity import HeldOut, SvdProbe  # noqa: E402
from ddtd.methods import SvdConfig  # noqa: E402
from ddtd.pipeline import prepare  # noqa: E402
from ddtd.planning import plan  # noqa: E402
from ddtd.sensitivity import output_sensitivity  # noqa: E402
from photos import make_sets  # noqa: E402
from pretrained import load  # noqa: E402


def svd_config(norm: str, allocation: str, ratio: float) -> CompressConfig:
    """The plan's request: Sigma-SVD (or Frobenius SVD) at a whole-model ratio of parameters."""
    return CompressConfig(method=SvdConfig(), norm=norm, size=Size(ratio=ratio, allocation=allocation))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.1, 1.25, 1.5, 2.0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import os

    calib_dir, eval_dir = make_sets(os.environ.get("DDTD_CACHE", "~/.cache/ddtd") + "/photos", 512, args.eval_images)
    tf = ImageTransform(size=224)
    model = load(args.model, False).eval()
    work, _ = prepare(model)
    calib = torch.cat(list(ImageFolder.scan(calib_dir).batches(tf, num=args.images, batch_size=64)))
    evals = list(ImageFolder.scan(eval_dir).batches(tf, batch_size=64))
    held = HeldOut(work, evals, "cpu")
    lines = [f"# {args.model}: {len(calib)} calibration photos, {held.images} evaluation photos (disjoint sources)"]
    t = time.time()
    names = select_layers(work)
    moments = calibrate(work, calib, CalibrationConfig(show_progress=False), layers=[n for n in names if not (
        getattr(dict(work.named_modules())[n], "groups", 1) > 1)]).moments
    lines.append(f"# calibration {time.time() - t:.0f} s")
    t = time.time()
    weights = output_sensitivity(work, list(calib[:128].split(32)), names)
    lines.append(f"# sensitivity (128 photos) {time.time() - t:.0f} s")
    rows = {}
    for label, norm, alloc in (("sigma + sensitivity", "sigma", "sensitivity"), ("sigma + relative", "sigma", "relative"),
                               ("frobenius", "frobenius", "relative")):
        base = plan(work, moments, svd_config(norm, alloc, 1.001), input_shape=(3, 224, 224))
        probe = SvdProbe(work, moments, [p.name for p in base.layers if p.method is not None or "would not shrink" in p.reason],
                         sigma_norm=norm == "sigma", correct_bias=norm == "sigma",
                         out_weights=weights if alloc == "sensitivity" else None)
        for r in args.ratios:
            pl = plan(work, moments, svd_config(norm, alloc, r), input_shape=(3, 224, 224),
                      weights=weights if alloc == "sensitivity" else None, spectra=probe.spectra())
            f = held.measure(probe.model_at({p.name: p.ranks for p in pl.active}))
            rows[(label, r)] = f
            print(label, r, f, flush=True)
    lines.append("")
    lines.append("| ratio (params) | " + " | ".join(f"{lab}: agreement / logit error" for lab in
                                                    ("sigma + sensitivity", "sigma + relative", "frobenius")) + " |")
    lines.append("|---|---|---|---|")
    for r in args.ratios:
        cells = [f"{100 * rows[(lab, r)].agreement:.1f}% / {rows[(lab, r)].relative_error:.3f}"
                 for lab in ("sigma + sensitivity", "sigma + relative", "frobenius")]
        lines.append(f"| {r}x | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
