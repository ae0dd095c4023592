"""Architectures of ddtd's reference models (weights are trained by ``examples/``).

* ``resnet18``: torchvision's ``resnet18(num_classes=10)`` unchanged (load it with
  ``--model resnet18 --num-classes 10 --weights PATH``).
* :func:`vgg_fmnist`: an all-3x3-conv VGG-style network for 32x32 inputs (load it with
  ``--model ddtd.zoo:vgg_fmnist --weights PATH``).
* :func:`vit_fmnist`: a small torchvision ``VisionTransformer`` for 32x32 inputs (4x4 patches,
  4 encoder blocks of width 64; ``nn.MultiheadAttention`` inside).
"""

from __future__ import annotations

from torch import nn

__all__ = ["vgg_fmnist", "vit_fmnist"]

VGG_FMNIST_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")


def vgg_fmnist(num_classes: int = 10, in_channels: int = 3, cfg=VGG_FMNIST_CFG, hidden: int = 256) -> nn.Module:
    """VGG-style classifier: 3x3 conv + BN + ReLU blocks, 2x2 max-pools, two Linear layers.

    Input ``(N, in_channels, 32, 32)``; output ``(N, num_classes)``.
    """
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.Flatten(),
        nn.Linear(c * 2 * 2, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def vit_fmnist(num_classes: int = 10, hidden: int = 64, layers: int = 4, heads: int = 4) -> nn.Module:
    """torchvision ``VisionTransformer`` for 32x32 inputs: 4x4 patches (64 tokens + the class
    token), ``layers`` blocks of width ``hidden`` with ``heads`` heads and an MLP of ``2 hidden``."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, num_layers=layers, num_heads=heads, hidden_dim=hidden,
                             mlp_dim=2 * hidden, num_classes=num_classes)
