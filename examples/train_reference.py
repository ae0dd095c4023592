"""Train (or load from cache) ddtd's reference classifiers on Fashion-MNIST, on the CPU.

    python examples/train_reference.py --model resnet18      # torchvision resnet18, 10 classes
    python examples/train_reference.py --model vgg           # ddtd.zoo:vgg_fmnist
    python examples/train_reference.py --model mobilenet_v3_small   # torchvision, 10 classes
    python examples/train_reference.py --model resnet18 --recipe demo   # the demo's quick model

Inputs are 32x32, 3 channels (the grey image replicated), normalised with ImageNet mean / std:
exactly what `ddtd calibrate --images calib/<subset> --size 32` feeds the model, through the same
`ddtd.data.preprocess`. The full recipe (``--recipe full``, the benchmarks' models) trains each
model for several epochs on all 60k training images, 10-15 minutes per epoch-set on 2 CPU cores;
the demo recipe (``--recipe demo``) trains one epoch on a seeded 12k-image subset in about a minute
(its test accuracy is recorded in the metrics file). Models are cached (state dict, ddtd model
file and metrics) under $DDTD_CACHE (default ~/.cache/ddtd/reference), so a second run only
loads them.
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
import torch.nn.functional as F
from tqdm import tqdm

from ddtd.atomic import atomic_path
from ddtd.data import ImageTransform, preprocess
from ddtd.datasets import load_fashion_mnist
from ddtd.model_io import build_from_spec, save_model

SPECS = {
    "resnet18": {"source": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
    "vgg": {"source": "factory", "name": "ddtd.zoo:vgg_fmnist", "kwargs": {"num_classes": 10}},
    # depthwise-separable, not close to low rank (issue 5's test bed for low-rank + sparse)
    "mobilenet_v3_small": {"source": "torchvision", "name": "mobilenet_v3_small", "kwargs": {"num_classes": 10}},
    # a small vision transformer (nn.MultiheadAttention inside), trained with AdamW
    "vit": {"source": "factory", "name": "ddtd.zoo:vit_fmnist", "kwargs": {"num_classes": 10}},
}
EPOCHS = {"resnet18": 12, "vgg": 8, "mobilenet_v3_small": 20, "vit": 6}
#: Models trained with AdamW (learning rate, weight decay) instead of SGD with Nesterov momentum.
ADAMW = {"vit": (2e-3, 0.05)}
#: The demo recipe: one epoch on this many training images (a seeded subset).
DEMO_IMAGES = 12_000
TRANSFORM = ImageTransform(size=32, channels=3)
CACHE = Path(os.environ.get("DDTD_CACHE", Path.home() / ".cache" / "ddtd")) / "reference"


def paths(name: str, recipe: str = "full") -> dict[str, Path]:
    stem = f"{name}_fmnist" + ("_demo" if recipe == "demo" else "")
    return {
        "weights": CACHE / f"{stem}.pt",
        "model": CACHE / f"{stem}.ddtd",
        "metrics": CACHE / f"{stem}.json",
    }


@torch.no_grad()
def evaluate(model, x, y, batch=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts (reflect-free zero padding) and horizontal flips."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    out = padded[..., dy : dy + 32, dx : dx + 32]
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return out.contiguous()


def bf16_is_fast() -> bool:
    """bfloat16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(name: str, epochs: int, batch_size: int, lr: float, seed: int, recipe: str = "full") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr_u8, ytr = load_fashion_mnist("train")
    if recipe == "demo":
        keep = torch.randperm(len(xtr_u8), generator=torch.Generator().manual_seed(seed))[:DEMO_IMAGES]
        xtr_u8, ytr = xtr_u8[keep], ytr[keep]
    xte_u8, yte = load_fashion_mnist("test")
    xtr = torch.cat([preprocess(xtr_u8[i : i + 5000], TRANSFORM) for i in range(0, len(xtr_u8), 5000)])
    xte = torch.cat([preprocess(xte_u8[i : i + 5000], TRANSFORM) for i in range(0, len(xte_u8), 5000)])
    model = build_from_spec(SPECS[name]).to(memory_format=torch.channels_last)
    amp = bf16_is_fast()  # mixed precision for speed; the saved weights are float32
    steps = epochs * math.ceil(len(xtr) / batch_size)
    if name in ADAMW:
        lr, wd = ADAMW[name]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        bar = tqdm(range(0, len(xtr), batch_size), desc=f"{name} epoch {epoch + 1}/{epochs}", unit="batch")
        for i in bar:
            idx = perm[i : i + batch_size]
            xb = augment(xtr[idx], gen).to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, xte, yte)
        print(f"{name}: epoch {epoch + 1} test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    metrics = {
        "model": name,
        "test_accuracy": acc,
        "train_seconds": round(time.time() - t0, 1),
        "epochs": epochs,
        "recipe": recipe,
        "train_images": len(xtr),
        "threads": torch.get_num_threads(),
        "bf16_autocast": amp,
        "transform": TRANSFORM.to_dict(),
    }
    p = paths(name, recipe)
    model = model.to(memory_format=torch.contiguous_format)
    with atomic_path(p["weights"]) as tmp:
        torch.save(model.state_dict(), tmp)
    save_model(model, p["model"], spec=SPECS[name], metrics=metrics)
    with atomic_path(p["metrics"]) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return metrics


def ensure(name: str, epochs: int | None = None, batch_size: int = 128, lr: float = 0.1, seed: int = 0,
           recipe: str = "full") -> dict:
    """Train ``name`` unless its cached files exist; return its metrics and file paths."""
    p = paths(name, recipe)
    if all(v.exists() for v in p.values()):
        metrics = json.loads(p["metrics"].read_text())
        print(f"{name}: cached at {p['model']} (test accuracy {metrics['test_accuracy']:.4f})")
    else:
        default_epochs = 1 if recipe == "demo" else EPOCHS[name]
        metrics = train(name, epochs or default_epochs, batch_size, lr, seed, recipe)
    return {**metrics, **{k: str(v) for k, v in p.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SPECS) + ["all"], default="all")
    ap.add_argument("--epochs", type=int, default=None,
                    help="default: 12 (resnet18), 8 (vgg), 20 (mobilenet_v3_small), 6 (vit)")
    ap.add_argument("--recipe", choices=["full", "demo"], default="full",
                    help=f"full: the benchmarks' models; demo: 1 epoch on {DEMO_IMAGES} images (about a minute)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: all cores; use 1 when the machine is shared)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = sorted(SPECS) if args.model == "all" else [args.model]
    for name in names:
        info = ensure(name, args.epochs, args.batch_size, args.lr, args.seed, args.recipe)
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
