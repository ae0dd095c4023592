"""Write a class-stratified, seeded calibration subset as image files.

    python calib/make_subset.py --source fashion-mnist --split train --num 512 --out calib/fmnist-512
    python calib/make_subset.py --source /path/to/imagefolder --num 256 --out calib/my-256

The output is a folder of PNG files (Fashion-MNIST, sub-folders "00-t-shirt" ... "09-ankle-boot"
so that their sorted order is the label order) or copies of the chosen files (image folder),
one sub-folder per class, so `ddtd calibrate --images <out>` and `ddtd eval` can use it.
The folder is built beside the target and renamed into place, so an interrupted run leaves
nothing half-written.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

from ddtd.data import ImageFolder
from ddtd.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from ddtd.errors import DdtdError


def stratified(labels: list[int], num: int, seed: int) -> list[int]:
    """Indices of ``num`` items, as equal per class as possible, reproducible for ``seed``."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    for idx in by_class.values():
        rng.shuffle(idx)
    classes = sorted(by_class)
    chosen, k = [], 0
    while len(chosen) < num and any(by_class[c] for c in classes):
        c = classes[k % len(classes)]
        if by_class[c]:
            chosen.append(by_class[c].pop())
        k += 1
    return chosen


def build(source: str, out: Path, num: int, seed: int, split: str) -> int:
    out = Path(out)
    if out.exists():
        print(f"{out} exists; leaving it as it is (delete it to rebuild)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if source == "fashion-mnist":
            images, labels = load_fashion_mnist(split)
            idx = stratified(labels.tolist(), num, seed)
            for i in idx:
                # "03-dress": sorted folder names follow the label indices, so `ddtd eval`
                # (classes = sorted sub-folders) scores a Fashion-MNIST model correctly.
                name = f"{int(labels[i]):02d}-{FASHION_MNIST_CLASSES[int(labels[i])]}"
                (tmp / name).mkdir(exist_ok=True)
                Image.fromarray(images[i, 0].numpy(), mode="L").save(tmp / name / f"{split}-{i:05d}.png")
        else:
            folder = ImageFolder.scan(source)
            labels = [folder.label_of(p) for p in folder.files]
            idx = stratified(labels, num, seed)
            for i in idx:
                src = folder.files[i]
                rel = src.relative_to(folder.root)
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {len(idx)} images to {out}")
    return len(idx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="fashion-mnist", help="'fashion-mnist' or an image folder")
    ap.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    ap.add_argument("--num", type=int, default=512, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        build(args.source, args.out, args.num, args.seed, args.split)
    except DdtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
