"""Synthetic layers and activation covariances for tests and benchmarks.

:func:`activation_patches` builds inputs the way a real conv layer sees them: correlated
Gaussian images (channel mixing with a decaying spectrum, spatial smoothing), one random 3x3 conv
plus ReLU (so the statistics are non-Gaussian, non-negative and have a large mean), unfolded with
``torch.nn.functional.unfold``.  Its covariance is strongly anisotropic and *not* a Kronecker
product of a channel and a spatial covariance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn


def activation_images(S: int, n_images: int, size: int, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n_images, S, size, size)`` ReLU activations of a random conv on correlated noise."""
    g = torch.Generator().manual_seed(int(seed))
    c0 = max(8, S // 2)
    # channel mixing with power-law spectrum
    mix = torch.randn(c0, c0, generator=g) * (torch.arange(1, c0 + 1, dtype=torch.float32) ** -0.8)
    x = torch.randn(n_images, c0, size + 4, size + 4, generator=g)
    x = torch.einsum("nchw,dc->ndhw", x, mix)
    blur = torch.tensor([0.25, 0.5, 0.25])
    kb = (blur[:, None] * blur[None, :]).expand(c0, 1, 3, 3).contiguous()
    x = Fn.conv2d(x, kb, groups=c0)
    w = torch.randn(S, c0, 3, 3, generator=g) / (c0 * 9) ** 0.5
    b = 0.3 * torch.randn(S, generator=g)
    x = torch.relu(Fn.conv2d(x, w, b))
    return x[:, :, :size, :size].to(dtype)


def activation_patches(S: int, k: int, n_images: int, size: int, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unfolded ``k x k`` patches ``(N, S*k*k)`` of :func:`activation_images` (padding 1)."""
    x = activation_images(S, n_images, size, seed, dtype)
    cols = Fn.unfold(x, k, padding=k // 2)                  # (n, D, L)
    return cols.permute(0, 2, 1).reshape(-1, S * k * k)


def activation_sigma(S: int, k: int, n_images: int, size: int, seed: int = 0,
                     centred: bool = True, chunk: int = 8) -> torch.Tensor:
    """``(D, D)`` float64 covariance of :func:`activation_patches`, accumulated in chunks."""
    D = S * k * k
    acc = torch.zeros(D, D, dtype=torch.float64)
    s = torch.zeros(D, dtype=torch.float64)
    n = 0
    x = activation_images(S, n_images, size, seed)
    for i in range(0, n_images, chunk):
        cols = Fn.unfold(x[i:i + chunk], k, padding=k // 2).permute(0, 2, 1).reshape(-1, D)
        acc += (cols.T @ cols).double()
        s += cols.double().sum(0)
        n += cols.shape[0]
    sig = acc / n
    if centred:
        mu = s / n
        sig = sig - torch.outer(mu, mu)
    return 0.5 * (sig + sig.T)


def structured_kernel(T: int, S: int, k: int, seed: int = 0, decay: float = 1.0,
                      noise: float = 0.05) -> torch.Tensor:
    """A ``(T, S, k, k)`` kernel with a power-law singular spectrum plus noise (trained-like)."""
    g = torch.Generator().manual_seed(int(seed))
    D = S * k * k
    n = min(T, D)
    U = torch.linalg.qr(torch.randn(T, n, generator=g))[0]
    V = torch.linalg.qr(torch.randn(D, n, generator=g))[0]
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -decay
    W = (U * s) @ V.T
    W = W / W.norm() + noise * torch.randn(T, D, generator=g) / (T * D) ** 0.5
    return W.reshape(T, S, k, k)
