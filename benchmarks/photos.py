"""Natural photographs available offline, as two disjoint image folders: calibration and evaluation.

Sources: scikit-image's bundled photographs (``skimage.data``) and, when installed, the photos of
Debian's wallpaper packages under ``/usr/share/backgrounds``. The source photos are split in two
(alternately, by name), so no photo contributes to both folders; each folder holds random crops
(10-100% of the area, aspect 3/4-4/3) with random horizontal flips, saved at 256 px on the
shorter side (ddtd's ImageNet transform then centre-crops 224).

    python benchmarks/photos.py --calib 512 --eval 256 --out ~/.cache/ddtd/photos
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera", "moon", "coins", "clock", "brick", "grass", "gravel", "cell", "text", "page")
BACKGROUNDS = Path("/usr/share/backgrounds")


def sources() -> dict[str, np.ndarray]:
    """name -> RGB uint8 array of every available photograph."""
    import skimage.data

    out = {}
    for name in SKIMAGE_PHOTOS:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that would need a download
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        out[f"skimage-{name}"] = arr[:, :, :3].astype(np.uint8)
    if BACKGROUNDS.is_dir():
        for p in sorted(BACKGROUNDS.iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                try:
                    out[f"bg-{p.stem}"] = np.asarray(Image.open(p).convert("RGB"))
                except OSError:
                    continue
    return out


def _crop(img: np.ndarray, rng: np.random.Generator, side: int) -> Image.Image:
    h, w = img.shape[:2]
    for _ in range(20):
        area = h * w * rng.uniform(0.1, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 16 <= cw <= w and 16 <= ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = img[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pil = Image.fromarray(np.ascontiguousarray(crop))
    scale = side / min(pil.size)
    return pil.resize((max(side, round(pil.size[0] * scale)), max(side, round(pil.size[1] * scale))),
                      Image.BILINEAR)


def make_sets(out: str | os.PathLike, n_calib: int, n_eval: int, seed: int = 0, side: int = 256) -> tuple[Path, Path]:
    """Write ``out/calib-N`` and ``out/eval-M`` (disjoint source photos); reuse them if complete."""
    out = Path(out).expanduser()
    photos = sources()
    names = sorted(photos)
    split = {"calib": names[0::2], "eval": names[1::2]}
    dirs = {}
    for kind, n in (("calib", n_calib), ("eval", n_eval)):
        d = out / f"{kind}-{n}-s{seed}"
        dirs[kind] = d
        if d.is_dir() and len(list(d.glob("*.png"))) == n:
            continue
        tmp = out / f".{d.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + (0 if kind == "calib" else 1))
        for i in range(n):
            src = split[kind][i % len(split[kind])]
            _crop(photos[src], rng, side).save(tmp / f"{i:05d}-{src}.png")
        if d.exists():
            import shutil

            shutil.rmtree(d)
        tmp.rename(d)
    return dirs["calib"], dirs["eval"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("DDTD_CACHE", "~/.cache/ddtd") + "/photos")
    args = ap.parse_args()
    c, e = make_sets(args.out, args.calib, args.eval, args.seed)
    print(f"calibration: {c}\nevaluation: {e}")


if __name__ == "__main__":
    main()
