import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image


@pytest.fixture(scope="module")
def single_thread():
    """Tiny problems: one thread is faster, and on a shared machine OpenMP with more threads
    than free cores stalls badly. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_images(folder, n, size=(12, 10), mode="RGB", classes=("a", "b"), seed=0, start=0):
    """Write ``n`` random images into class sub-folders; return their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        d = folder / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        p = d / f"img{i:04d}.png"
        Image.fromarray(arr, mode=mode).save(p)
        paths.append(p)
    return paths


class TinyNet(torch.nn.Module):
    """Convs with stride / padding / dilation / groups and a Linear on 3-D input."""

    def __init__(self, channels=3, classes=5):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.conv3 = torch.nn.Conv2d(8, 12, 1)
        self.fc = torch.nn.Linear(12, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.conv3(x)
        x = x.flatten(2).transpose(1, 2)  # (N, L, 12): Linear on a 3-D input
        return self.fc(x).mean(1)


def tiny_net(channels: int = 3, classes: int = 5):
    return TinyNet(channels, classes)


class TinyEncoder(nn.Module):
    """A small pure-PyTorch transformer classifier on float sequences ``(B, L, 8)``: an input
    projection, two ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention`` inside) and
    a linear head on the mean token."""

    def __init__(self, d_in: int = 8, width: int = 32, heads: int = 4, classes: int = 5, batch_first: bool = True):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=batch_first, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)
        self.batch_first = batch_first

    def forward(self, x):
        h = self.enc(self.inp(x))
        return self.head(h.mean(1 if self.batch_first else 0))


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return TinyEncoder(**kw).eval()


def plain_cnn(classes: int = 5):
    """Four 3x3 convs and a classifier, wide enough for 2-3x compressions of the middle layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)).eval()
