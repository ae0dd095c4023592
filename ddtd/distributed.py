"""Calibration and compression on several processes and machines with ``torch.distributed``.

ddtd never starts a process group from library code: :func:`ddtd.calibrate` and
:func:`ddtd.compress` work on several processes when the caller has initialised one
(``torch.distributed.init_process_group``, https://pytorch.org/docs/stable/distributed.html), and
the command line starts one only when ``torchrun`` launched it (:func:`init_from_env`; ``ddtd
calibrate --nproc N`` launches ``torchrun`` on this machine, :func:`launch`). Without a group every
function here is a no-op for one process.

What is split, and how:

* **inputs**: every rank reads a disjoint shard of the inputs a single process would read: an
  image folder's seeded sample cut into contiguous blocks by rank (:func:`shard_bounds`,
  :func:`image_batches`), the samples of a tensor / tuple / dict by index, the batches of a
  DataLoader or list by position (batch ``i`` to rank ``i % world``) unless the DataLoader has a
  ``DistributedSampler`` (then its own share is used as given). A shard may be empty;
* **moments**: the float64 raw sums ``sum x x^T``, ``sum x`` are added across ranks with one
  ``all_reduce(SUM)`` per tensor (:func:`sum_moments`), so every rank ends with the sums a single
  process computes (up to the rounding of the float32 products of each batch);
* **layer solves** (non-sequential fitting): layers are given to ranks by estimated cost, the
  largest first, each to the least loaded rank (:func:`assign_by_cost`), and the fits are
  gathered on every rank.

**Failures.** Ranks talk only at agreed points (:func:`agree`): an ``all_gather_object`` of each
rank's status and payload. Code between two agreed points runs no collective, so a rank that
raises reports its error at the next agreed point (:func:`shared_failures`) and every rank
raises :class:`RankFailure` with that rank's message; rank 0 writes its output only after every
rank agreed that all went well, so nothing is written when a rank fails.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import socket

import torch

from .errors import DdtdError, InputError

__all__ = ["RankFailure", "active", "rank", "world_size", "launched", "init_from_env", "rank_device", "launch",
           "shard_bounds", "agree", "broadcast", "shared_failures", "all_reduce_sums", "sum_moments",
           "image_batches", "batch_filter", "assign_by_cost", "free_port", "TORCHRUN_ENV"]

log = logging.getLogger("ddtd")

#: Environment variables ``torchrun`` sets for every worker, read by the ``env://`` initialisation.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(DdtdError):
    """Raised on every rank when one rank failed: names the first failing rank and its message."""

    def __init__(self, failed_rank: int, message: str, world: int, others: int = 0):
        self.rank = failed_rank
        extra = f" ({others} other rank(s) failed too)" if others else ""
        super().__init__(f"rank {failed_rank} of {world} failed: {message}{extra}",
                         hint="every rank stopped and nothing was written; fix that rank's error and run again")


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return torch.distributed.get_world_size() if active() else 1


def launched() -> bool:
    """Whether ``torchrun`` (or an equivalent launcher) started this process: its environment
    variables (:data:`TORCHRUN_ENV`) are set."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def rank_device(device: str | None) -> str | None:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a group (one GPU per
    process on each machine); anything else is kept."""
    if device == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextlib.contextmanager
def init_from_env(device: str | None = None):
    """Initialise the default process group from ``torchrun``'s environment (``env://``) for the
    body and destroy it afterwards: NCCL when ``device`` is a CUDA device, else gloo. Does nothing
    (yields ``False``) when no launcher set the environment or a group already exists.

    The command line's entry point; library functions only use a group the caller made."""
    if active() or not launched():
        yield False
        return
    cuda = str(device or "cpu").startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield True
    finally:
        torch.distributed.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m ddtd ARGV`` on ``nproc`` processes of this machine through torchrun's
    launcher (``torch.distributed.run``, https://pytorch.org/docs/stable/elastic/run.html) with a
    loopback rendezvous; the exit status of the first failed worker, or 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr",
                                         "127.0.0.1", "--master-port", str(free_port()), "--module", "ddtd", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    return 0


def shard_bounds(n: int, of_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, stop)`` of rank ``of_rank``'s contiguous block of ``n`` items (the first
    ``n % world`` ranks get one more; a block may be empty). ``(0, n)`` without a group."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DdtdError) else f"{type(exc).__name__}: {exc}"


def agree(payload=None, *, error: BaseException | None = None) -> list:
    """An agreed point: every rank's ``payload`` (in rank order), once every rank got here.

    Every rank must call it the same number of times. A rank that passes ``error`` reports a
    failure; then every rank raises :class:`RankFailure` naming the first failed rank. Without a
    group: ``[payload]`` (or ``error`` raised)."""
    if not active():
        if error is not None:
            raise error
        return [payload]
    world = world_size()
    out: list = [None] * world
    torch.distributed.all_gather_object(out, (None if error is None else _message(error), payload))
    failed = [(r, status) for r, (status, _) in enumerate(out) if status is not None]
    if failed:
        raise RankFailure(failed[0][0], failed[0][1], world, len(failed) - 1)
    return [p for _, p in out]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (an agreed point)."""
    return agree(obj if rank() == 0 else None)[0]


@contextlib.contextmanager
def shared_failures():
    """Run the body on every rank; an exception on one rank is reported at the next agreed point,
    so every rank raises :class:`RankFailure` with its message instead of waiting forever for the
    failed rank. A :class:`RankFailure` passes through; without a group exceptions pass as they are."""
    if not active():
        yield
        return
    try:
        yield
    except RankFailure:
        raise
    except Exception as exc:
        agree(error=exc)
        raise


def all_reduce_sums(tensors: list[torch.Tensor]) -> int:
    """Add ``tensors`` across ranks in place (``all_reduce`` with ``ReduceOp.SUM``); the bytes each
    rank sends into the reduction. gloo reduces CPU copies of device tensors."""
    if not active():
        return 0
    dist = torch.distributed
    gloo = dist.get_backend() == "gloo"
    sent = 0
    for t in tensors:
        if gloo and t.device.type != "cpu":
            tmp = t.cpu()
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        sent += t.numel() * t.element_size()
    return sent


def sum_moments(moments: dict, count: int, order: list[str], device) -> tuple[dict, int, dict]:
    """The raw moments of every rank added up (an agreed point, then one ``all_reduce`` per
    tensor): ``({layer: LayerMoments}, total count, {layer: bytes reduced})``. A rank that saw no
    input for a layer (an empty shard) adds zeros; layers are kept in ``order``."""
    if not active():
        return moments, count, {}
    from .calibration.collector import LayerMoments

    local = {n: (tuple(lm.xxT.shape), tuple(lm.x_sum.shape), lm.count, lm.meta) for n, lm in moments.items()}
    views = agree((count, local))
    sent, out = {}, {}
    for name in order:
        seen = [v[name] for _, v in views if name in v]
        if not seen:
            continue  # called on no rank
        lm = moments.get(name)
        if lm is None:
            xxT_shape, sum_shape, _, meta = seen[0]
            lm = LayerMoments(torch.zeros(xxT_shape, dtype=torch.float64, device=device),
                              torch.zeros(sum_shape, dtype=torch.float64, device=device), 0, dict(meta))
        xxT, x_sum = lm.xxT.contiguous(), lm.x_sum.contiguous()
        sent[name] = all_reduce_sums([xxT, x_sum])
        out[name] = LayerMoments(xxT, x_sum, sum(s[2] for s in seen), lm.meta)
    return out, sum(c for c, _ in views), sent


def image_batches(folder, transform, num: int | None, seed: int, batch_size: int, progress=None):
    """This rank's batches of an image folder's seeded sample (``folder.sample(None, seed)``):
    the first ``num`` readable files, as one process reads them, cut into contiguous blocks by
    rank. An unreadable file is replaced as in one process: after each round the ranks agree on
    how many images were read, and the next files of the order are split the same way.
    ``folder.unreadable`` and ``folder.used`` end the same on every rank (all ranks' files)."""
    order = folder.sample(None, seed)
    want = len(order) if num is None else min(num, len(order))
    pos, used, unreadable = 0, 0, []
    while used < want and pos < len(order):
        chunk = order[pos:pos + want - used]
        pos += len(chunk)
        start, stop = shard_bounds(len(chunk))
        before = len(folder.unreadable)
        yield from folder.decode(chunk[start:stop], transform, stop - start, batch_size, progress=progress)
        rounds = agree((folder.used, folder.unreadable[before:]))
        used += sum(u for u, _ in rounds)
        unreadable += [line for _, lines in rounds for line in lines]
    folder.unreadable[:], folder.used = unreadable, used
    if used == 0:
        raise InputError(
            f"none of the {len(order)} image files under '{folder.root}' could be read "
            f"({len(unreadable)} unreadable, e.g. {unreadable[0] if unreadable else '-'})",
            hint="check the files are valid images (try opening one), or point --images elsewhere")


def _has_distributed_sampler(loader) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    samplers = (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def batch_filter(loader, num: int | None) -> tuple:
    """How this rank takes the batches of an iterable (a DataLoader, a list): ``(mine, limit)``,
    ``mine(i)`` whether batch ``i`` is this rank's and ``limit`` the samples counted before the
    rest is cut. A DataLoader with a ``DistributedSampler`` already yields this rank's share: all
    of it is used, and ``num`` is split like :func:`shard_bounds`. Otherwise every rank iterates
    every batch and keeps batch ``i`` when ``i % world == rank`` (``num`` counts all ranks'
    samples, as in one process). Without a group: every batch, ``num``."""
    w, r = world_size(), rank()
    if w == 1:
        return (lambda i: True), num
    if _has_distributed_sampler(loader):
        if num is None:
            return (lambda i: True), None
        start, stop = shard_bounds(num)
        return (lambda i: True), stop - start
    return (lambda i: i % w == r), num


def assign_by_cost(costs: dict[str, float], world: int | None = None) -> dict[str, int]:
    """Greedy longest-processing-time assignment: the costliest remaining item to the rank with
    the least total cost so far (ties: the lower rank, the earlier item); ``{item: rank}``."""
    w = world_size() if world is None else world
    loads = [(0.0, r) for r in range(w)]
    heapq.heapify(loads)
    out = {}
    for i, name in sorted(enumerate(costs), key=lambda t: (-costs[t[1]], t[0])):
        load, r = heapq.heappop(loads)
        out[name] = r
        heapq.heappush(loads, (load + costs[name], r))
    return out
