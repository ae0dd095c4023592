"""Auto's candidates on trained-like conv layers: which format has the lowest Sigma error at the
same parameter count, and what its probe and full fit cost.

    .venv/bin/python benchmarks/auto_candidates.py

Layers: ``(T, S, 3, 3)`` kernels with a power-law singular spectrum plus noise and the centred
covariance of unfolded 3x3 patches of ReLU activations (tests/synthetic.py), 64 x 32 and
64 x 64, at 2x / 4x / 8x.  Every candidate gets the ranks :func:`ddtd.planning.ranks_for_format`
gives it for the svd rank of that ratio (the parameters of that svd at most, as ``auto``
compares them), with the default config (damping 1e-3); ``probe`` is the fit cut to 5
iterations (``AutoConfig.probe_iters``), ``full`` the default iterations.  ``err`` is the
relative squared Sigma error ``tr(dW Sigma dW^T) / tr(W Sigma W^T)`` of the returned factors.
One thread; the machine is shared, so the seconds are indicative.

The latest output is written to benchmarks/results/auto_candidates.txt.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import activation_sigma, structured_kernel  # noqa: E402

from ddtd.layers import factorized_weight  # noqa: E402
from ddtd.methods import (CPConfig, SvdConfig, TTConfig, Tucker2Config, get_method,  # noqa: E402
                          relative_sigma_error, with_settings)
from ddtd.planning import ranks_for_format  # noqa: E402
from ddtd.ranks import LayerShape  # noqa: E402

CANDIDATES = {"svd": SvdConfig(), "tucker2": Tucker2Config(), "cp3": CPConfig("cp3"), "cp4": CPConfig("cp4"),
              "tt": TTConfig()}
PROBE_ITERS = 5


def _fit(name, cfg, K, sig, ranks, layer):
    t = time.perf_counter()
    fit = get_method(name).solve(K, sig[None], ranks, cfg, name="layer", groups=1)
    secs = time.perf_counter() - t
    W = factorized_weight(layer, get_method(name).kind, *fit.factors)
    return relative_sigma_error(K, W, sig), secs


def main() -> None:
    torch.set_num_threads(1)
    lines = ["command: .venv/bin/python benchmarks/auto_candidates.py",
             f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f}"]
    wins = {}
    for T, S, seed in ((64, 32, 0), (64, 64, 1)):
        K = structured_kernel(T, S, 3, seed=seed)
        sig = activation_sigma(S, 3, 48, 12, seed=seed + 1)
        layer = nn.Conv2d(S, T, 3, padding=1)
        shape = LayerShape(T=T, S=S, kh=3, kw=3, pos_in=144, pos_out=144)
        for ratio in (2, 4, 8):
            svd_rank = max(1, int(T * S * 9 / ratio // (S * 9 + T)))
            lines.append(f"T={T} S={S} 3x3 at {ratio}x (svd rank {svd_rank}):")
            best = None
            for name, cfg in CANDIDATES.items():
                ranks = ranks_for_format(name, shape, svd_rank)
                cells = []
                if name != "svd":
                    e, s = _fit(name, with_settings(cfg, max_iter=PROBE_ITERS), K, sig, ranks, layer)
                    cells.append(f"probe err {e:.4f} {s:6.2f} s")
                e, s = _fit(name, cfg, K, sig, ranks, layer)
                cells.append(f"full err {e:.4f} {s:6.2f} s")
                best = min(best or (e, name), (e, name))
                lines.append(f"  {name:8s} ranks {str(ranks):14s} " + "   ".join(cells))
            wins[best[1]] = wins.get(best[1], 0) + 1
            print("\n".join(lines[-len(CANDIDATES) - 1:]), flush=True)
    lines.append("lowest full-fit error: " + ", ".join(f"{k} {v}" for k, v in sorted(wins.items())))
    print(lines[-1])
    out = Path(__file__).resolve().parent / "results" / "auto_candidates.txt"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
