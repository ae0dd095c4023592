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

from . import distributed
from ._version import __version__
from .errors import DdtdError

log = logging.getLogger("ddtd")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _bounded_float(ok, expected: str):
    """An argparse type: a float for which ``ok(value)`` holds, else a message naming ``expected``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


_ratio = _bounded_float(lambda v: 1 < v < float("inf"), "a finite number > 1 (a compression ratio, e.g. 4)")
_error_budget = _bounded_float(lambda v: 0 < v < 1, "a number in (0, 1) (a relative error budget, e.g. 0.05)")
_fraction = _bounded_float(lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _joined(parts) -> tuple[float, ...]:
    """``--mean 0.5 0.5 0.5`` and ``--mean 0.5,0.5,0.5`` alike: the parsed pieces joined."""
    return tuple(v for part in parts for v in part)


def _rank(text: str):
    """An int rank >= 1, ``R1,R2`` (tucker2's two ranks), or a float > 1 (a per-layer ratio);
    checked by :func:`ddtd.ranks.check_rank_request`."""
    from .errors import InputError
    from .ranks import check_rank_request

    if "," in text:
        try:
            pair = tuple(int(v) for v in text.split(","))
            return check_rank_request(pair)
        except (ValueError, InputError) as exc:
            raise argparse.ArgumentTypeError(f"expected two ranks R1,R2 >= 1 (e.g. 16,8), got {text!r}") from exc
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int rank (e.g. 16) or a per-layer ratio > 1 (e.g. 2.5), got {text!r}") from None
    if value.is_integer() and "." not in text and "e" not in text.lower():
        if value < 1:
            raise argparse.ArgumentTypeError(f"a rank must be at least 1, got {text}")
        return int(value)
    if not value > 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a per-layer ratio must be a finite number > 1, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="torchvision architecture name, 'package.module:factory', or a .ddtd / TorchScript file")
    g.add_argument("--weights", help="local state dict for the architecture (loaded with weights_only=True)")
    g.add_argument("--num-classes", type=int, help="number of classes, where it differs from the default")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    g.add_argument("--trust-factory", metavar="MODULE", default=None,
                   help="allow a .ddtd file given as --model to import and call a factory from MODULE "
                        "(comma-separated; torchvision architectures and ddtd.zoo need no opt-in). A model "
                        "file never runs code of its own choosing without this")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    from .data import IMAGENET_MEAN, IMAGENET_STD

    g = p.add_argument_group("images")
    g.add_argument("--images", required=True, type=Path, help="folder of images (class sub-folders allowed)")
    g.add_argument("--num-images", type=_positive_int, default=None, help="use this many images (default: all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the reproducible image sample (and of the "
                                                       "held-out split)")
    g.add_argument("--size", type=_positive_int, default=224, help="input side after the centre crop (default 224)")
    g.add_argument("--resize", type=_positive_int, default=None, help="shorter side before cropping (default: --size)")
    g.add_argument("--mean", type=_floats, nargs="+", default=[IMAGENET_MEAN], metavar="M",
                   help="per-channel mean, space- or comma-separated (default ImageNet: 0.485 0.456 0.406)")
    g.add_argument("--std", type=_floats, nargs="+", default=[IMAGENET_STD], metavar="S",
                   help="per-channel std, space- or comma-separated (default ImageNet: 0.229 0.224 0.225)")
    g.add_argument("--channels", type=_positive_int, default=None, help="input channels (default: the first conv's)")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: 32 at 224 px, more for smaller images, up to 512)")


def _optional_images(p: argparse.ArgumentParser) -> None:
    """``--images`` becomes optional (``--text`` or a store may stand in)."""
    p.set_defaults(images=None)
    for a in p._actions:
        if a.dest == "images":
            a.required = False


def _add_text_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text (a local Hugging Face model directory as --model; needs ddtd[text])")
    g.add_argument("--text", type=Path, default=None,
                   help="text file (one sample per line) or folder of .txt files, instead of --images")
    g.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: --model)")
    g.add_argument("--max-length", type=_positive_int, default=128, help="tokens per sample at most (default 128)")


def _text_data(args):
    """Tokenized dict batches of ``--text`` (or ``None`` without it)."""
    if getattr(args, "text", None) is None:
        return None
    from .text import text_batches

    return text_batches(args.text, args.tokenizer or args.model, max_length=args.max_length,
                        batch_size=args.batch_size or 32, num=args.num_images, seed=args.seed)


def _load(args, model=None, weights=None):
    from .model_io import load_model

    return load_model(model or args.model, weights=weights if model else args.weights, num_classes=args.num_classes,
                      device=args.device, trust_factory=args.trust_factory)


def _model_inputs(args) -> dict:
    """The files a command reads its model from (never to be overwritten by an output)."""
    paths = {"--weights": args.weights}
    if args.model and Path(args.model).exists():
        paths["--model"] = args.model
    return paths


def cmd_calibrate(args) -> int:
    from .calibration import calibrate, save_calibration
    from .config import CalibrationConfig
    from .calibration.run import first_layer_channels
    from .checks import check_outputs, resolve_device
    from .data import ImageTransform

    out = Path(args.output)
    resolve_device(args.device)
    if args.append and not out.exists():
        raise DdtdError(f"--append given but '{out}' does not exist",
                        hint="drop --append to create a new store")
    check_outputs({"-o": out}, _model_inputs(args))
    if args.images is None and args.text is None:
        raise DdtdError("nothing to calibrate on", hint="pass --images DIR or --text FILE")
    model = _load(args)
    texts = _text_data(args)
    transform = ImageTransform(
        size=args.size, resize=args.resize, mean=_joined(args.mean), std=_joined(args.std),
        channels=args.channels or first_layer_channels(model),
    )
    config = CalibrationConfig(transform=transform, num_images=args.num_images, seed=args.seed,
                               batch_size=args.batch_size)
    result = calibrate(model, texts if texts is not None else args.images, config, layers=args.layers,
                       max_dim=args.max_dim, device=args.device)
    if distributed.rank() != 0:
        return 0  # rank 0 writes the sums of every rank
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
    from .checks import check_outputs

    check_outputs({"-o": args.output}, {"store": args.stores})
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


def _transform_from(args, model):
    from .calibration.run import first_layer_channels
    from .data import ImageTransform

    return ImageTransform(size=args.size, resize=args.resize, mean=_joined(args.mean), std=_joined(args.std),
                          channels=args.channels or first_layer_channels(model))


def cmd_compress(args) -> int:
    import json as _json

    from .checks import check_outputs, resolve_device
    from .pipeline import compress
    from .model_io import save_model
    from .selection import layer_filter
    from .report import format_report, write_json

    out = Path(args.output)
    resolve_device(args.device)
    if args.images is None and args.calib is None and args.text is None:
        raise DdtdError("nothing to fit against",
                        hint="pass --calib STORE.h5 (from ddtd calibrate), --images DIR or --text FILE")
    if args.min_agreement is not None and args.max_drop is not None:
        raise DdtdError("give --min-agreement or --max-drop, not both", hint="--max-drop D is --min-agreement 1-D")
    min_agreement = _min_agreement(args)
    if (min_agreement is not None or args.max_output_error is not None) and args.images is None and args.text is None:
        raise DdtdError("a fidelity target is measured on held-out images", hint="pass --images DIR or --text FILE")
    if all(x is None for x in (args.ratio, args.rank, args.ranks, args.error, min_agreement, args.max_output_error)) \
            and args.strategy != "vbmf":
        raise DdtdError("no size given", hint="pass --ratio R, --min-agreement A, --rank R, --ranks FILE or --error E")
    exports = {f"--export {args.export}": out.with_suffix(".ts" if args.export == "torchscript" else ".onnx")
               } if args.export else {}
    check_outputs({"-o": out, "--report-json": args.report_json, **exports},
                  {**_model_inputs(args), "--calib": args.calib, "--ranks": args.ranks})
    model = _load(args)
    if getattr(model, "ddtd_spec", None) is None:
        raise DdtdError("this model has no rebuildable architecture spec, so its compressed file could "
                        "not be loaded back", hint="pass --model as an architecture name / factory / .ddtd file")
    transform = _transform_from(args, model)
    ranks = None
    if args.ranks:
        try:
            ranks = _json.loads(Path(args.ranks).read_text())
        except (OSError, ValueError) as exc:
            raise DdtdError(f"cannot read --ranks file '{args.ranks}' ({exc})",
                            hint='give a JSON object {"layer.name": rank, ...}') from exc
    texts = _text_data(args)
    result = compress(model, texts if texts is not None else args.images,
                      _compress_config(args, None if texts is not None else transform, ranks), store=args.calib,
                      filter_fn=layer_filter(model, args.layers, include_first=args.include_first,
                                             include_last=args.include_last))
    if distributed.rank() != 0:
        return 0  # rank 0 writes the model every rank fitted
    save_model(result.model, out, spec=model.ddtd_spec, replacements=result.records,
               report=result.report.to_dict(), transform=transform.to_dict() if texts is None else None)
    print(format_report(result.report))
    _print_fidelity(result.report.fidelity)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if args.report_json:
        write_json(result.report.to_dict(), args.report_json)
    if args.export:
        _export(result.model, out, args.export, (1, transform.channels, transform.size, transform.size))
    return 0


def _min_agreement(args):
    return args.min_agreement if args.max_drop is None else 1 - args.max_drop


def _compress_config(args, transform, ranks):
    """The :class:`ddtd.config.CompressConfig` of ``ddtd compress``'s options (the one place the
    CLI builds it)."""
    from .config import config_from_options

    sequential = None if args.sequential is None else ("on" if args.sequential else "off")
    return config_from_options(
        method=args.method, norm=args.norm, ratio=args.ratio, rank=args.rank, ranks=ranks, error=args.error,
        min_agreement=_min_agreement(args), max_output_error=args.max_output_error, budget=args.budget,
        strategy=args.strategy, allocation=args.allocation, sequential=sequential, device=args.device,
        transform=transform, num_images=args.num_images, seed=args.seed, batch_size=args.batch_size,
        holdout=args.holdout, scope=args.scope, stages=args.stages,
        input_shape=(transform.channels, transform.size, transform.size) if transform is not None else None,
        max_iter=args.max_iter, tol=args.tol, solver_seed=args.solver_seed, sparsity=args.sparsity,
        lrs_init=args.lrs_init, stabilize=False if args.no_stabilize else None, stable_finish=args.stable_finish,
        probe_iters=args.probe_iters)


def _print_fidelity(fid: dict) -> None:
    """Held-out fidelity lines of a compression (and the probe curve of a target search)."""
    for c in fid.get("curve") or []:
        if c.get("relative_error") is None:
            print(f"  probe {c['ratio']:.3f}x: out of reach")
            continue
        agree = "-" if c.get("agreement") is None else f"{100 * c['agreement']:.1f}%"
        print(f"  probe {c['ratio']:.3f}x: agreement {agree}, output error {c['relative_error']:.3f}"
              f"{'  (meets the target)' if c.get('meets') and fid.get('target') else ''}")
    h = fid.get("heldout")
    if h:
        agree = "-" if h.get("agreement") is None else f"{100 * h['agreement']:.2f}%"
        where = ("of --images held out (they may be in the --calib store too: give it other images for "
                 "an independent check)" if fid.get("from_store") else "calibration inputs not used to fit")
        print(f"held-out fidelity ({h['images']} {where}): top-1 agreement {agree}, "
              f"relative output error {h['relative_error']:.4f}")
    if fid.get("safe_ratio_estimate"):
        print(f"POOR FIDELITY: a ratio of about {fid['safe_ratio_estimate']:.2f}x keeps 99% agreement "
              "(--min-agreement 0.99)")


def _export(model, out: Path, kind: str, shape) -> None:
    import torch

    from .atomic import atomic_path

    example = torch.randn(*shape, device=next(model.parameters()).device)
    model.eval()
    if kind == "torchscript":
        target = out.with_suffix(".ts")
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        with atomic_path(target) as tmp:
            traced.save(str(tmp))
    else:
        try:
            import onnx  # noqa: F401
        except ImportError as exc:
            raise DdtdError("ONNX export needs the onnx package", hint="pip install 'ddtd[onnx]'") from exc
        target = out.with_suffix(".onnx")
        with atomic_path(target) as tmp:
            torch.onnx.export(model, example, str(tmp), dynamo=False)
    print(f"exported {target}")


def cmd_eval(args) -> int:
    from .checks import check_outputs, resolve_device
    from .config import CalibrationConfig
    from .evaluate import evaluate, paired_latency
    from .report import write_json

    resolve_device(args.device)
    inputs = {**_model_inputs(args), "--reference-weights": args.reference_weights}
    if args.reference and Path(args.reference).exists():
        inputs["--reference"] = args.reference
    check_outputs({"--json": args.json}, inputs)
    model = _load(args)
    ref = None
    if args.reference:
        ref = _load(args, model=args.reference, weights=args.reference_weights)
    transform = _transform_from(args, ref if ref is not None and not hasattr(model, "ddtd_spec") else model)
    if args.no_labels and ref is None:
        raise DdtdError("--no-labels measures only the agreement with --reference, and none was given",
                        hint="pass --reference MODEL")
    config = CalibrationConfig(transform=transform, num_images=args.num_images, seed=args.seed,
                               batch_size=args.batch_size)
    res = evaluate(model, args.images, config, reference=ref, device=args.device, labels=not args.no_labels)
    shape = (transform.channels, transform.size, transform.size)
    if not args.no_latency:
        models = {"model": model} if ref is None else {"model": model, "reference": ref}
        lat = paired_latency(models, shape, device=args.device)
        res.latency_ms = lat["model"]
        res.reference_latency_ms = lat.get("reference")
    print(f"images: {res.images}")
    if res.accuracy is not None:
        print(f"top-1 accuracy: {100 * res.accuracy:.2f}%"
              + (f" (reference {100 * res.reference_accuracy:.2f}%)" if res.reference_accuracy is not None else ""))
    if res.agreement is not None:
        print(f"top-1 agreement with the reference: {100 * res.agreement:.2f}%; "
              f"relative output error {res.relative_output_error:.4f}")
    if res.latency_ms:
        for k, v in res.latency_ms.items():
            line = f"latency {k}: {v:.2f} ms"
            if res.reference_latency_ms:
                r = res.reference_latency_ms[k]
                line += f" (reference {r:.2f} ms, speedup {r / v:.2f}x)"
            print(line)
    if args.json:
        import dataclasses

        from .model_io import read_model_file_meta

        meta = read_model_file_meta(args.model)
        report = meta.get("report") or {}
        settings = report.get("settings", {})
        write_json({**dataclasses.asdict(res), "model": str(args.model), "ratio": report.get("ratio"),
                    "macs_ratio": report.get("macs_ratio"), "method": settings.get("method"),
                    "norm": settings.get("norm")}, args.json)
    return 0


def cmd_report(args) -> int:
    import json as _json

    from .report import Report
    from .model_io import read_model_file_meta
    from .report import format_report, plot_accuracy, write_json

    from .checks import check_outputs

    check_outputs({"--json": args.json, "--plot": args.plot}, {"file": args.files})
    results = []
    for path in args.files:
        if not Path(path).is_file():
            raise DdtdError(f"'{path}' not found", hint="pass .ddtd files written by ddtd compress or "
                            "JSON files written by ddtd eval --json")
        if str(path).endswith(".json"):
            try:
                data = _json.loads(Path(path).read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise DdtdError(f"'{path}' is not valid JSON ({exc})",
                                hint="pass JSON files written by ddtd eval --json") from exc
            if not isinstance(data, dict) or "images" not in data:
                raise DdtdError(f"'{path}' is not an eval result", hint="pass JSON files written by ddtd eval --json")
            results.append(data)
            continue
        meta = read_model_file_meta(path)
        if not meta.get("report"):
            raise DdtdError(f"'{path}' holds no compression report", hint="pass a file written by ddtd compress")
        try:
            report = Report.from_dict(meta["report"])
        except (TypeError, KeyError, ValueError) as exc:
            raise DdtdError(f"the report in '{path}' is damaged ({exc})",
                            hint="re-create the file with ddtd compress") from exc
        print(f"== {path}")
        print(format_report(report))
        if args.json:
            write_json(meta["report"], args.json if len(args.files) == 1 else f"{args.json}.{Path(path).stem}.json")
    if args.plot:
        plot_accuracy(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ddtd", description="Data-driven tensor decompositions for PyTorch models.")
    ap.add_argument("--version", action="version", version=f"ddtd {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_calibrate, _add_merge, _add_compress, _add_eval, _add_report, _add_info):
        add(sub)
    return ap


def _data_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that reads a model and calibration data (images or text)."""
    p = sub.add_parser(name, help=help)
    _add_model_args(p)
    _add_image_args(p)
    _optional_images(p)
    _add_text_args(p)
    return p


def _add_calibrate(sub) -> None:
    from .calibration import DEFAULT_MAX_DIM

    p = _data_command(sub, "calibrate", "store each layer's input covariance (HDF5)")
    p.add_argument("--layers", default=None,
                   help="comma-separated globs on layer names ('layer1.*,fc'); 're:' for a regex")
    p.add_argument("--max-dim", type=_positive_int, default=DEFAULT_MAX_DIM,
                   help=f"skip layers whose patch length exceeds this (default {DEFAULT_MAX_DIM})")
    p.add_argument("--append", action="store_true", help="add to the store at -o instead of replacing it")
    p.add_argument("-o", "--output", required=True, help="output .h5 store")
    _add_nproc(p)
    p.set_defaults(func=cmd_calibrate)


def _add_nproc(p) -> None:
    p.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="run on N processes of this machine (torchrun with a loopback address; each reads a "
                        "shard of the inputs, rank 0 writes). Under torchrun (--nproc-per-node) leave it out")


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="add up stores of the same model")
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_merge)


def _add_compress(sub) -> None:
    p = _data_command(sub, "compress", "compress a model (no fine-tuning) and write a .ddtd file")
    p.add_argument("--calib", type=Path, help="covariance store from `ddtd calibrate` (else --images calibrates)")
    p.add_argument("--norm", choices=["sigma", "frobenius"], default="sigma")
    from .methods import METHODS

    p.add_argument("--method", choices=["auto", *METHODS], default="auto",
                   help="auto: per layer the lowest Sigma error at the allocated size among svd, tucker2, "
                        "cp3, cp4 (+ lrs when --budget params), CP made stable; cp3-stable / cp4-stable: "
                        "minimal sensitivity at the CP-ALS error; lrs: low rank + sparse; sparse: pruning only")
    p.add_argument("--sparsity", type=_fraction, default=None,
                   help="lrs: fraction of each layer's bytes given to the sparse part (default: the split "
                        "with the lowest Sigma error)")
    p.add_argument("--lrs-init", choices=["data", "residual", "masked", "auto"], default=None,
                   help="lrs: initialisation (residual / masked: Hawkins et al. 2021, eq. 12 / 13-14)")
    p.add_argument("--probe-iters", type=int, default=None,
                   help="auto: compare the iterative formats after this many iterations and fit only the winner "
                        "in full (default 5; 0: fit every format in full)")
    p.add_argument("--no-stabilize", action="store_true",
                   help="auto: keep plain CP-ALS factors instead of the minimal-sensitivity ones")
    p.add_argument("--stable-finish", choices=["channel", "refit", "none"], default=None,
                   help="stable CP's last step: channel = least-squares scale per output channel "
                        "(default), refit = least-squares output factor (lower layer error, a few per "
                        "cent more sensitive), none = the minimal-sensitivity point itself")
    _add_size_args(p)
    p.add_argument("--budget", choices=["both", "params", "flops"], default="both",
                   help="what --ratio counts: both (default) = parameters, and no layer may get more "
                        "multiply-adds than its dense original; params = bytes only (low rank + sparse, "
                        "which runs dense, may be chosen); flops = multiply-adds")
    p.add_argument("--strategy", choices=["global", "uniform", "vbmf"], default="global")
    p.add_argument("--stages", type=_positive_int, default=1,
                   help="reach --ratio in this many compressions of geometric ratios, recalibrating on the "
                        "compressed model between them (chains are re-fitted, the layer count does not grow)")
    p.add_argument("--scope", choices=["model", "layers"], default="model",
                   help="what --ratio is a ratio of: the whole model (default) or the compressible layers alone "
                        "(for transformers, whose embedding tables no low-rank format shrinks)")
    p.add_argument("--layers", help="globs of layers to compress (default: all but the first conv and the classifier)")
    p.add_argument("--include-first", action="store_true", help="also compress the input layer")
    p.add_argument("--include-last", action="store_true", help="also compress the final classifier")
    seq = p.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_true", default=None,
                     help="fit each layer on the outputs of the already-compressed layers (default with "
                          "--images and the Sigma norm: per layer, sequential when it lowers the output error "
                          "on a held-out quarter of the images by more than 3 standard errors)")
    seq.add_argument("--no-sequential", dest="sequential", action="store_false")
    p.add_argument("--max-iter", type=_positive_int, default=50, help="ALS iterations (tucker2, cp)")
    p.add_argument("--tol", type=_bounded_float(lambda v: v >= 0, "a number >= 0"), default=1e-5,
                   help="ALS relative improvement below which the iterations stop")
    p.add_argument("--solver-seed", type=int, default=0, help="seed of the ALS initialisations (tucker2, cp)")
    p.add_argument("--export", choices=["torchscript", "onnx"])
    p.add_argument("--report-json", type=Path)
    p.add_argument("-o", "--output", required=True, type=Path, help="compressed model file (.ddtd)")
    _add_nproc(p)
    p.set_defaults(func=cmd_compress)


def _add_size_args(p) -> None:
    size = p.add_argument_group("size (one of)")
    size.add_argument("--ratio", type=_ratio, help="whole-model compression ratio, e.g. 4")
    size.add_argument("--rank", type=_rank, help="every layer: an int rank (tucker2: R means R,R), R1,R2 for "
                                                  "tucker2, or a float > 1 = per-layer ratio")
    size.add_argument("--ranks", help='JSON file {"layer": rank or [R1, R2]}')
    size.add_argument("--error", type=_error_budget, help="per-layer relative Sigma error budget, e.g. 0.05")
    size.add_argument("--min-agreement", type=_bounded_float(lambda v: 0 < v <= 1, "a number in (0, 1]"),
                      help="fidelity target instead of a size: the largest whole-model ratio whose top-1 "
                           "agreement with the original, on calibration images held out of the fit, is at "
                           "least this (e.g. 0.95); needs --images")
    size.add_argument("--max-drop", type=_bounded_float(lambda v: 0 <= v < 1, "a number in [0, 1)"),
                      help="the same target as a drop: --max-drop 0.05 = --min-agreement 0.95")
    p.add_argument("--max-output-error", type=_bounded_float(lambda v: v > 0, "a number > 0"),
                   help="fidelity target (alone or with --min-agreement): the held-out relative output error "
                        "||f~(x) - f(x)|| / ||f(x)|| may be at most this")
    p.add_argument("--allocation", choices=["sensitivity", "relative"], default="sensitivity",
                   help="--strategy global: weigh each layer's error by its effect on the model's output "
                        "(sensitivity, default; needs --images) or relative to its own output energy")
    p.add_argument("--holdout", type=_bounded_float(lambda v: 0 <= v < 1, "a number in [0, 1)"), default=0.125,
                   help="share of the --images held out of the fit to measure fidelity (default 0.125; 0: none)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, agreement with the original, latency")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("--reference", help="the original model (name / factory / file)")
    p.add_argument("--reference-weights", help="its state dict, if --reference is an architecture name")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--no-labels", action="store_true",
                   help="ignore class sub-folders; measure only agreement / output error against --reference "
                        "(labels are the sorted sub-folder names = class indices 0..K-1, K must equal the "
                        "model's outputs)")
    p.add_argument("--json", type=Path, help="write the results as JSON (input of `ddtd report --plot`)")
    p.set_defaults(func=cmd_eval)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="per-layer table of compressed files; plot of eval results")
    p.add_argument("files", nargs="+", type=Path, help=".ddtd files (tables) and/or eval .json files (plot)")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="PNG of accuracy against ratio from eval .json files")
    p.set_defaults(func=cmd_report)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a covariance store")
    p.add_argument("store", type=Path)
    p.set_defaults(func=cmd_info)



def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _run(args) -> int:
    """The command, on every rank when torchrun started this process (a gloo / NCCL group from
    its environment; rank 0 writes after every rank agreed that all went well)."""
    with distributed.init_from_env(getattr(args, "device", None)):
        if hasattr(args, "device"):
            args.device = distributed.rank_device(args.device)
        if distributed.rank() != 0:
            logging.getLogger("ddtd").setLevel(logging.ERROR)  # rank 0 speaks for all
        with distributed.shared_failures():
            code = args.func(args)
            distributed.agree()  # rank 0 has written: every rank ends together
        return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    if (getattr(args, "nproc", None) or 1) > 1 and not distributed.launched():
        return distributed.launch(_without_nproc(argv), args.nproc)
    try:
        code = _run(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except DdtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (existing outputs are unchanged)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (``ddtd info X | head``): stop quietly
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
