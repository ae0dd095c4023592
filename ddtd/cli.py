"""``ddtd`` command line: a thin shell over the typed Python API.

    ddtd calibrate --model resnet18 --weights w.pt --num-classes 10 --images calib/fmnist-512 \\
                   --size 32 -o calib.h5
    ddtd calibrate ... --append -o calib.h5       # add more images to an existing store
    ddtd merge a.h5 b.h5 -o all.h5                # stores made on different machines
    ddtd info calib.h5                            # what a store holds
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ._version import __version__
from .errors import DdtdError

log = logging.getLogger("ddtd")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.replace(",", " ").split())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="torchvision architecture name, 'package.module:factory', or a .ddtd / TorchScript file")
    g.add_argument("--weights", help="local state dict for the architecture (loaded with weights_only=True)")
    g.add_argument("--num-classes", type=int, help="number of classes, where it differs from the default")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    from .data import IMAGENET_MEAN, IMAGENET_STD

    g = p.add_argument_group("images")
    g.add_argument("--images", required=True, type=Path, help="folder of images (class sub-folders allowed)")
    g.add_argument("--num-images", type=int, default=None, help="use this many images (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the reproducible image sample")
    g.add_argument("--size", type=int, default=224, help="input side after the centre crop (default 224)")
    g.add_argument("--resize", type=int, default=None, help="shorter side before cropping (default: --size)")
    g.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, help="per-channel mean (default ImageNet)")
    g.add_argument("--std", type=_floats, default=IMAGENET_STD, help="per-channel std (default ImageNet)")
    g.add_argument("--channels", type=int, default=None, help="input channels (default: the first conv's)")
    g.add_argument("--batch-size", type=int, default=32)


def cmd_calibrate(args) -> int:
    from .calibration import calibrate, save_calibration
    from .calibration.run import first_layer_channels
    from .data import ImageTransform
    from .model_io import load_model

    out = Path(args.output)
    if args.append and not out.exists():
        raise DdtdError(f"--append given but '{out}' does not exist",
                        hint="drop --append to create a new store")
    model = load_model(args.model, weights=args.weights, num_classes=args.num_classes, device=args.device)
    transform = ImageTransform(
        size=args.size, resize=args.resize, mean=args.mean, std=args.std,
        channels=args.channels or first_layer_channels(model),
    )
    result = calibrate(
        model, args.images, layers=args.layers, transform=transform, num_images=args.num_images,
        seed=args.seed, batch_size=args.batch_size, max_dim=args.max_dim, device=args.device,
    )
    t_write = time.time()
    save_calibration(result, out, append=args.append)
    size = out.stat().st_size
    n_img = result.info.num_images
    print(f"calibrated {len(result.moments)} layers on {n_img} images in {result.seconds:.1f} s "
          f"({n_img / max(result.seconds, 1e-9):.1f} img/s); wrote {out} ({size / 2**20:.1f} MiB) "
          f"in {time.time() - t_write:.1f} s" + (" [appended]" if args.append else ""))
    for name, reason in result.skipped.items():
        print(f"  skipped {name}: {reason}")
    if result.unreadable or result.non_images:
        print(f"  ignored {len(result.unreadable)} unreadable image files and {result.non_images} non-image files")
        for line in result.unreadable[:5]:
            print(f"    {line}")
    return 0


def cmd_merge(args) -> int:
    from .calibration import merge_stores

    info = merge_stores(args.stores, args.output)
    print(f"merged {len(args.stores)} stores ({info.num_images} images, {len(info.layers)} model layers) "
          f"into {args.output} ({Path(args.output).stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_info(args) -> int:
    from .calibration import CovarianceStore

    store = CovarianceStore(args.store)
    i = store.info
    print(f"{store.path}: ddtd {i.ddtd_version}, format {i.format_version}, fingerprint {i.fingerprint}")
    print(f"  images: {i.num_images}; transform: {i.transform}; seed: {i.seed}")
    print(f"  sources: {i.sources}")
    print(f"  layers stored: {len(store.names)} of {len(i.layers)}")
    for name in store.names:
        lm = store[name]
        print(f"    {name:40s} {lm.meta.get('type', '?'):7s} groups={lm.groups:<4d} D={lm.dim:<6d} samples={lm.count}")
    for name, reason in i.skipped.items():
        print(f"  skipped {name}: {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .calibration import DEFAULT_MAX_DIM

    ap = argparse.ArgumentParser(prog="ddtd", description="Data-driven tensor decompositions for PyTorch models.")
    ap.add_argument("--version", action="version", version=f"ddtd {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="store each layer's input covariance (HDF5)")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("--layers", default=None,
                   help="comma-separated globs on layer names ('layer1.*,fc'); 're:' for a regex")
    p.add_argument("--max-dim", type=int, default=DEFAULT_MAX_DIM,
                   help=f"skip layers whose patch length exceeds this (default {DEFAULT_MAX_DIM})")
    p.add_argument("--append", action="store_true", help="add to the store at -o instead of replacing it")
    p.add_argument("-o", "--output", required=True, help="output .h5 store")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("merge", help="add up stores of the same model")
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("info", help="describe a covariance store")
    p.add_argument("store", type=Path)
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except DdtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
