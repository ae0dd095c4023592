"""Calibration and compression on several gloo processes of this CPU (loopback address).

Each group test starts its processes once (importing torch takes seconds) and runs several cases
in them; the parent compares with single-process runs. Exactness is checked on float64 models:
then the sums differ from one process only by the order of float64 additions (1e-12 relative);
a float32 model's per-batch products round differently when the batches differ (checked at 1e-6).
"""

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from conftest import plain_cnn, tiny_net, write_images
from ddtd import distributed
from ddtd.calibration import CovarianceStore, calibrate, save_calibration
from ddtd.cli import main
from ddtd.config import CalibrationConfig, config_from_options
from ddtd.data import ImageTransform
from ddtd.model_io import save_model
from ddtd.pipeline import compress

TESTS = Path(__file__).resolve().parent
TIMEOUT = 90


class Float64Net(nn.Module):
    """tiny_net in float64, fed float32 images (cast first): exact sums for the comparisons."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_net().double()

    def forward(self, x):
        return self.net(x.double())


class FailingNet(nn.Module):
    """tiny_net that raises at its second batch on rank 1."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.net, self.calls = tiny_net(classes=num_classes), 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 2:
            raise RuntimeError("boom in the second batch")
        return self.net(x)


def failing_net(num_classes: int = 5):
    return FailingNet(num_classes)


def _samples(n=12):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _inputs(world: int | None, folders: Path) -> dict:
    """The calibration inputs of every case (``world``: the DistributedSampler's replicas)."""
    x = _samples()
    cases = {"images": folders / "imgs", "two-images": folders / "two", "tensor": x[:11], "tuple": (x[:11],),
             "dict": {"x": x[:11]}, "list": list(x[:11].split(3))}
    sampler = DistributedSampler(TensorDataset(x), shuffle=False) if world else None
    cases["sampler"] = DataLoader(TensorDataset(x), batch_size=2, sampler=sampler)
    return cases


CAL = dict(transform=ImageTransform(size=16), batch_size=2, show_progress=False)


def _compress_configs():
    return {"tucker2": config_from_options(method="tucker2", ratio=2.0, sequential="off", max_iter=5, batch_size=8),
            "svd-seq": config_from_options(method="svd", ratio=2.0, sequential="on", batch_size=8, holdout=0)}


def _api_worker(rank, world, port, tmp):
    """Every case on one rank of a gloo group; rank 0 writes the results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tmp = Path(tmp)
        for name, data in _inputs(world, tmp).items():
            res = calibrate(Float64Net(), data, CalibrationConfig(**CAL), check_variance=False)
            if rank == 0:
                save_calibration(res, tmp / f"{name}-{world}.h5")
        if world == 2:
            for name, cfg in _compress_configs().items():
                res = compress(plain_cnn().double(), _samples(24), cfg)
                if rank == 0:
                    torch.save((res.model.state_dict(), [(r.name, r.method, r.ranks) for r in res.report.layers]),
                               tmp / f"{name}-{world}.pt")
            import ddtd.pipeline as pipeline

            def broken(*a, **k):
                if rank == 1:
                    raise RuntimeError("solver exploded")
                return solve(*a, **k)

            solve, pipeline.solve = pipeline.solve, broken
            try:
                compress(plain_cnn().double(), _samples(24), _compress_configs()["tucker2"])
            except distributed.RankFailure as exc:
                (tmp / f"failure-{rank}.txt").write_text(str(exc))
    finally:
        torch.distributed.destroy_process_group()


def _cli_worker(rank, world, port, argv, log):
    """``ddtd ARGV`` as torchrun starts it (its environment variables), stderr to ``log``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    sys.stderr = open(f"{log}.{rank}", "w")
    sys.exit(main(argv))


def _start(target, world, *args) -> list:
    """Run ``target(rank, world, port, *args)`` on ``world`` spawned processes; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    port = distributed.free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _assert_same_store(a: Path, b: Path, rtol: float, world: int):
    sa, sb = CovarianceStore(a), CovarianceStore(b)
    assert sa.info.fingerprint == sb.info.fingerprint and sa.info.transform == sb.info.transform
    assert sa.info.num_images == sb.info.num_images and sa.names == sb.names
    assert sa.info.sources[0]["world_size"] == world and "world_size" not in sb.info.sources[0]
    assert {k: v for k, v in sa.info.sources[0].items() if k not in ("id", "world_size")} == \
        {k: v for k, v in sb.info.sources[0].items() if k != "id"}
    for name in sa.names:
        x, y = sa[name], sb[name]
        assert x.count == y.count
        for p, q in ((x.xxT, y.xxT), (x.x_sum, y.x_sum)):
            torch.testing.assert_close(p, q, rtol=0, atol=rtol * q.abs().max().item())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_images(tmp / "imgs", 7)
    write_images(tmp / "two", 2, seed=3)
    for name, data in _inputs(None, tmp).items():
        save_calibration(calibrate(Float64Net(), data, CalibrationConfig(**CAL), check_variance=False),
                         tmp / f"{name}-1.h5")
    return tmp


@pytest.mark.parametrize("world", [2, 3])
def test_stores_and_compress_equal_one_process(folders, world, single_thread):
    assert _start(_api_worker, world, str(folders)) == [0] * world
    for name in _inputs(None, folders):
        # 2 images on 3 ranks: rank 2's shard is empty and adds zeros
        _assert_same_store(folders / f"{name}-{world}.h5", folders / f"{name}-1.h5", 1e-12, world)
    if world != 2:
        return
    for name, cfg in _compress_configs().items():
        one = compress(plain_cnn().double(), _samples(24), cfg)
        state, layers = torch.load(folders / f"{name}-2.pt")
        assert layers == [(r.name, r.method, r.ranks) for r in one.report.layers]
        ref = one.model.state_dict()
        assert state.keys() == ref.keys()
        for k, v in ref.items():  # the same solves on moments equal to 1e-12: equal to the solvers' rounding
            torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-6 * v.abs().max().item())
    for r in range(2):  # a rank that raises in its layer solves stops both, with its message
        assert "rank 1 of 2 failed: RuntimeError: solver exploded" in (folders / f"failure-{r}.txt").read_text()


def test_a_failing_rank_stops_every_rank_and_writes_nothing(tmp_path):
    write_images(tmp_path / "imgs", 7)
    out = tmp_path / "calib.h5"
    argv = ["calibrate", "--model", "test_distributed:failing_net", "--images", str(tmp_path / "imgs"), "--size", "16",
            "--batch-size", "2", "-o", str(out)]
    codes = _start(_cli_worker, 2, argv, str(tmp_path / "log"))
    assert codes == [2, 2]
    for r in range(2):
        assert "rank 1 of 2 failed: RuntimeError: boom in the second batch" in (tmp_path / f"log.{r}").read_text()
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_cli_nproc_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = tiny_net()
    model.ddtd_spec = {"source": "factory", "name": "conftest:tiny_net", "kwargs": {}}
    save_model(model, tmp_path / "tiny.ddtd")
    write_images(tmp_path / "imgs", 9)
    common = ["calibrate", "--model", str(tmp_path / "tiny.ddtd"), "--images", str(tmp_path / "imgs"), "--size", "16",
              "--batch-size", "3", "--num-images", "8", "--trust-factory", "conftest"]
    assert main([*common, "-o", str(tmp_path / "one.h5")]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ddtd", *common, "--nproc", "2", "-o", str(tmp_path / "two.h5")],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "calibrated 4 layers on 8 images" in proc.stdout
    _assert_same_store(tmp_path / "two.h5", tmp_path / "one.h5", 1e-6, 2)  # float32 products of other batches


def test_shards_and_cost_assignment():
    assert [distributed.shard_bounds(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert [distributed.shard_bounds(7, r, 2) for r in range(2)] == [(0, 4), (4, 7)]
    assert distributed.shard_bounds(5) == (0, 5)  # no group: everything
    # longest processing time first: the big layer alone, the small ones together
    owner = distributed.assign_by_cost({"a": 1.0, "big": 10.0, "b": 2.0, "c": 3.0}, world=2)
    assert owner == {"big": 0, "c": 1, "b": 1, "a": 1}
    assert distributed.agree("x") == ["x"] and distributed.broadcast(3) == 3


def test_without_group_errors_pass_unchanged():
    with pytest.raises(ValueError):
        with distributed.shared_failures():
            raise ValueError("local")
