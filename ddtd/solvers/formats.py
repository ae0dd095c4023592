"""Parameter counts per decomposition format, and ranks for a parameter budget.

Layer shape ``(T, S, kh, kw)`` (a Linear layer is ``kh = kw = 1``), ``D = S*kh*kw``; counts are
weights only (biases excluded, the original bias is kept on the last factor either way).  For
grouped convs call with the per-group shape and multiply by ``g``.

======== ================================ ====================================
format   ranks                            parameters
======== ================================ ====================================
dense    -                                ``T * D``
svd      ``r``                            ``r * (D + T)``
tucker2  ``(R1, R2)``                     ``S*R2 + R1*R2*kh*kw + R1*T``
cp3      ``R``                            ``R * (S + kh*kw + T)``
cp4      ``R``                            ``R * (S + kh + kw + T)``
======== ================================ ====================================
"""

from __future__ import annotations

from ddtd.errors import InputError

FORMATS = ("svd", "tucker2", "cp3", "cp4")


def dense_params(T: int, S: int, kh: int = 1, kw: int = 1) -> int:
    return T * S * kh * kw


def param_count(fmt: str, T: int, S: int, kh: int, kw: int, ranks) -> int:
    """Number of weights of the factorised layer (see the module table)."""
    D = S * kh * kw
    if fmt == "svd":
        return int(ranks) * (D + T)
    if fmt == "tucker2":
        R1, R2 = (ranks, ranks) if isinstance(ranks, int) else ranks
        return S * R2 + R1 * R2 * kh * kw + R1 * T
    if fmt == "cp3":
        return int(ranks) * (S + kh * kw + T)
    if fmt == "cp4":
        return int(ranks) * (S + kh + kw + T)
    raise InputError(f"unknown format {fmt!r}", hint=f"use one of {FORMATS}")


def max_rank(fmt: str, T: int, S: int, kh: int, kw: int) -> int:
    """Largest meaningful rank (svd: ``min(T, D)``; tucker2: ``min(T, S)`` scale; cp: no hard
    limit, capped at the dense parameter count's equivalent)."""
    D = S * kh * kw
    if fmt == "svd":
        return min(T, D)
    if fmt == "tucker2":
        return min(T, S)
    return max(1, dense_params(T, S, kh, kw) // param_count(fmt, T, S, kh, kw, 1))


def tucker2_ranks(T: int, S: int, alpha: float) -> tuple[int, int]:
    """Tucker2 ranks proportional to the channel counts: ``(ceil-ish alpha*T, alpha*S)``, >= 1."""
    return max(1, min(T, round(alpha * T))), max(1, min(S, round(alpha * S)))


def rank_for_budget(fmt: str, T: int, S: int, kh: int, kw: int, budget: float):
    """Largest rank whose :func:`param_count` is ``<= budget`` (a parameter count).

    For ``tucker2`` the two ranks scale together with the channel counts (``R1/T = R2/S``) and
    the result is a tuple.  Returns rank 1 (or ``(1, 1)``) if even that exceeds the budget.
    """
    if fmt == "tucker2":
        lo, hi = 0.0, 1.0
        best = (1, 1)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            r = tucker2_ranks(T, S, mid)
            if param_count(fmt, T, S, kh, kw, r) <= budget:
                best, lo = r, mid
            else:
                hi = mid
        # greedy top-up of the output rank if room remains
        R1, R2 = best
        while R1 < T and param_count(fmt, T, S, kh, kw, (R1 + 1, R2)) <= budget:
            R1 += 1
        return R1, R2
    per = param_count(fmt, T, S, kh, kw, 1)
    r = max(1, int(budget // per))
    return min(r, max_rank(fmt, T, S, kh, kw)) if fmt == "svd" else r


def rank_for_ratio(fmt: str, T: int, S: int, kh: int, kw: int, ratio: float):
    """Rank for a compression ratio ``dense / compressed >= ratio`` of this layer."""
    if ratio <= 0:
        raise InputError(f"ratio must be > 0, got {ratio}", hint="e.g. ratio=4 for 4x fewer weights")
    return rank_for_budget(fmt, T, S, kh, kw, dense_params(T, S, kh, kw) / ratio)
