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
tt       conv: ``(R1, R2, R3)``           ``S*R1 + kh*R1*R2 + kw*R2*R3 + R3*T``
tt       1x1 / Linear: ``(r_1..r_{d-1})`` ``sum_k r_{k-1} t_k d_k r_k``
======== ================================ ====================================

``tt`` is the tensor train of the layer's weight: the TT convolution (U. Sainz de la Maza
Gamboa, "Tensor Decompositions for Neural Networks Compression", Master's thesis, UPV/EHU,
Table 6.1: ``C R3 + d R3 R + d R4 R + R4 T`` with ranks ``(R3, R, R4)`` there) for a ``kh x kw > 1`` kernel,
the TT-matrix (Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015) of ``W (T x D)``
with modes ``T = t_1..t_d``, ``D = d_1..d_d`` (default :func:`tt_matrix_modes`) and ``r_0 = r_d
= 1`` for a Linear layer or a 1x1 conv.  Ranks are given as one int (every bond) or one per
bond; the sizing functions clip them to the bond limits (:func:`tt_max_ranks`).
"""

from __future__ import annotations

import math

from ddtd.errors import InputError

FORMATS = ("svd", "tucker2", "cp3", "cp4", "tt")

#: Number of TT-matrix cores when the modes are chosen automatically.
DEFAULT_TT_CORES = 3


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """``d`` integers >= 1 whose product is ``n``, as equal as the prime factors of ``n`` allow
    (largest prime first into the currently smallest factor), in descending order."""
    if n < 1 or d < 1:
        raise InputError(f"cannot split {n} into {d} factors", hint="need n >= 1 and d >= 1")
    bins = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(d), key=lambda j: bins[j])
        bins[i] *= p
    return tuple(sorted(bins, reverse=True))


def tt_matrix_modes(T: int, D: int, cores: int = DEFAULT_TT_CORES, out_modes=None,
                    in_modes=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(out_modes, in_modes)`` of a ``T x D`` TT-matrix: the given ones (checked: products
    ``T`` and ``D``, same length), else :func:`balanced_factors` of ``T`` and ``D`` into ``cores``
    modes."""
    om = tuple(int(m) for m in out_modes) if out_modes is not None else None
    im = tuple(int(m) for m in in_modes) if in_modes is not None else None
    d = len(om) if om is not None else (len(im) if im is not None else int(cores))
    om = om if om is not None else balanced_factors(T, d)
    im = im if im is not None else balanced_factors(D, d)
    if len(om) != len(im) or math.prod(om) != T or math.prod(im) != D or min(om + im) < 1 or d < 1:
        raise InputError(f"TT-matrix modes {om} x {im} do not factor a {T} x {D} matrix",
                         hint="out_modes must multiply to the output size, in_modes to the input "
                              "size, with as many of each")
    return om, im


def tt_max_ranks(out_modes, in_modes) -> tuple[int, ...]:
    """Largest useful rank of each bond: ``min(prod_{j<=k} t_j d_j, prod_{j>k} t_j d_j)``."""
    n = [int(t) * int(d) for t, d in zip(out_modes, in_modes)]
    return tuple(min(math.prod(n[:k + 1]), math.prod(n[k + 1:])) for k in range(len(n) - 1))


def tt_matrix_ranks(ranks, out_modes, in_modes) -> tuple[int, ...]:
    """Bond ranks: an int ``r`` (every bond) or one int per bond, each clipped to
    :func:`tt_max_ranks`."""
    cap = tt_max_ranks(out_modes, in_modes)
    if isinstance(ranks, (int,)) and not isinstance(ranks, bool):
        rs = (int(ranks),) * len(cap)
    else:
        rs = tuple(int(r) for r in ranks)
    if len(rs) != len(cap) or (rs and min(rs) < 1):
        raise InputError(f"TT ranks {ranks!r} invalid for {len(cap) + 1} cores",
                         hint=f"give one int >= 1, or {len(cap)} ints >= 1 (one per bond)")
    return tuple(min(r, c) for r, c in zip(rs, cap))


def tt_conv_ranks(ranks, T: int, S: int, kh: int, kw: int) -> tuple[int, int, int]:
    """``(R1, R2, R3)`` of a TT convolution from an int or three ints, clipped to the bond
    limits ``(min(S, kh kw T), min(S kh, kw T), min(S kh kw, T))``."""
    return tt_matrix_ranks(ranks, (1, 1, 1, T), (S, kh, kw, 1))



def tt_matrix_params(out_modes, in_modes, ranks) -> int:
    """Weights of a TT-matrix: ``sum_k r_{k-1} t_k d_k r_k`` (ranks as given, not clipped)."""
    rs = (1,) + tuple(int(r) for r in ranks) + (1,)
    return sum(rs[k] * int(t) * int(d) * rs[k + 1] for k, (t, d) in enumerate(zip(out_modes, in_modes)))


def tt_matrix_macs(out_modes, in_modes, ranks) -> int:
    """Multiply-adds of one TT-matrix product ``W~ x`` (the cores applied from the last to the
    first, :class:`ddtd.layers.TTMatrix`): ``sum_k (prod_{j<=k} d_j)(prod_{j>=k} t_j) r_{k-1}
    r_k``."""
    rs = (1,) + tuple(int(r) for r in ranks) + (1,)
    om, im = tuple(out_modes), tuple(in_modes)
    return sum(math.prod(im[:k + 1]) * math.prod(om[k:]) * rs[k] * rs[k + 1] for k in range(len(om)))


def tt_ranks(T: int, S: int, kh: int, kw: int, ranks, modes=None) -> tuple[int, ...]:
    """The clipped bond ranks of the ``tt`` format of a ``(T, S, kh, kw)`` layer (``modes``:
    ``(out_modes, in_modes)`` of a TT-matrix, default :func:`tt_matrix_modes` with as many cores
    as the ranks ask for)."""
    if kh * kw > 1:
        return tt_conv_ranks(ranks, T, S, kh, kw)
    om, im = _tt_modes(T, S, ranks, modes)
    return tt_matrix_ranks(ranks, om, im)


def _tt_modes(T, D, ranks, modes):
    if modes is not None:
        return tt_matrix_modes(T, D, out_modes=modes[0], in_modes=modes[1])
    d = len(ranks) + 1 if isinstance(ranks, (tuple, list)) else DEFAULT_TT_CORES
    return tt_matrix_modes(T, D, d)


def tt_params(T, S, kh, kw, ranks, modes=None) -> int:
    rs = tt_ranks(T, S, kh, kw, ranks, modes)
    if kh * kw > 1:
        R1, R2, R3 = rs
        return S * R1 + kh * R1 * R2 + kw * R2 * R3 + R3 * T
    return tt_matrix_params(*_tt_modes(T, S, ranks, modes), rs)


def tt_rank_for_budget(T: int, S: int, kh: int, kw: int, budget: float, modes=None, cores=None):
    """Largest uniform TT rank (clipped per bond) whose weights fit ``budget``: a tuple of bond
    ranks (rank 1 everywhere if nothing fits).  ``modes`` / ``cores``: the TT-matrix modes."""
    if kh * kw > 1:
        cap = max(tt_conv_ranks(10 ** 9, T, S, kh, kw))
        shape_of = lambda r: r  # noqa: E731
    else:
        d = cores or (len(modes[0]) if modes is not None else DEFAULT_TT_CORES)
        cap = max(tt_max_ranks(*_tt_modes(T, S, (1,) * (d - 1), modes)), default=1)
        shape_of = lambda r: (r,) * (d - 1)  # noqa: E731
    lo, hi = 1, max(1, cap)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_params(T, S, kh, kw, shape_of(mid), modes) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return tt_ranks(T, S, kh, kw, shape_of(lo), modes)



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
    if fmt == "tt":
        return tt_params(T, S, kh, kw, ranks)
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
    if fmt == "tt":
        return tt_rank_for_budget(T, S, kh, kw, budget)
    per = param_count(fmt, T, S, kh, kw, 1)
    r = max(1, int(budget // per))
    return min(r, max_rank(fmt, T, S, kh, kw)) if fmt == "svd" else r


def rank_for_ratio(fmt: str, T: int, S: int, kh: int, kw: int, ratio: float):
    """Rank for a compression ratio ``dense / compressed >= ratio`` of this layer."""
    if ratio <= 0:
        raise InputError(f"ratio must be > 0, got {ratio}", hint="e.g. ratio=4 for 4x fewer weights")
    return rank_for_budget(fmt, T, S, kh, kw, dense_params(T, S, kh, kw) / ratio)
