"""Checkpoints across real worker processes on loopback (gloo, TCPStore on port 0).

Run as a script, this file is the worker: a tiny model under DDP or FSDP2, AdamW, an LR schedule,
dropout (so RNG state matters) and a data stream that is a pure function of (seed, step)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hyrun.common.snapshots import remove_snapshots
from hyrun.runtime.checkpoint.checkpointer import Checkpointer
from hyrun.runtime.checkpoint.settings import CheckpointSettings
from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.checkpoint.manifest import Manifest
from hyrun.runtime.checkpoint.snapshot import snapshot_path
from hyrun.runtime.checkpoint.verify import find_damage

GLOBAL_BATCH = 8
SEED = 1234


# ---- the worker ---------------------------------------------------------------------------------


def build_model(dropout: float) -> torch.nn.Module:
    torch.manual_seed(SEED)  # same initial parameters on every rank and every run
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 16)
    )


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of `step`: the data position is the step number."""
    gen = torch.Generator().manual_seed(SEED * 100_003 + step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    rows = GLOBAL_BATCH // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


class HangingStorage(LocalDirectoryStorage):
    """Fault injection keyed by step: the save of `hang_step` writes part of this rank's file, says so
    in a marker file, then hangs until the test SIGKILLs the worker."""

    def __init__(self, root: Path, hang_step: int, marker: Path) -> None:
        super().__init__(root)
        self.hang_step, self.marker = hang_step, marker

    def dcp_writer(self, step: int):
        writer = super().dcp_writer(step)
        if step != self.hang_step:
            return writer
        storage = self

        class Hang(type(writer)):
            def write_data(self, plan, planner):
                (storage.staging_path(step) / f"__{dist.get_rank()}_0.distcp").write_bytes(b"partial")
                storage.marker.write_text("hanging")
                time.sleep(3600)

        hanging = Hang(storage.staging_path(step), single_file_per_rank=True, sync_files=True)
        return hanging


def worker(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format=f"rank {args.rank} %(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", args.port, args.world, False, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=args.rank, world_size=args.world, timeout=timedelta(seconds=60)
    )
    rank, world = args.rank, args.world
    model = build_model(args.dropout)
    if args.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(SEED + 7 * rank)  # per-rank RNG: dropout masks differ by rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    settings = CheckpointSettings(directory=args.dir, interval_steps=args.interval_steps, keep_last=3)
    storage = None
    if args.hang_step:
        storage = HangingStorage(Path(args.dir), args.hang_step, Path(f"{args.out}.hanging"))
    ckpt = Checkpointer(
        settings, rank=rank, world_size=world, job_id=args.job, layout={"dp": world}, storage=storage
    )

    info = ckpt.load_latest(model, optimizer)
    start = 1
    if info is not None:
        schedule.load_state_dict(info.extra["lr_schedule"])
        start = info.extra["data_position"]
    losses, saved = {}, []
    for step in range(start, args.steps + 1):
        x, y = batch(step, rank, world)
        loss = torch.nn.functional.mse_loss(wrapped(x), y)
        loss.backward()
        ckpt.fence()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.AVG)
        losses[step] = reduced.item()
        if step == args.request_step and rank == args.request_rank:
            ckpt.request_now()  # "checkpoint now", heard by one rank only
        if ckpt.due(step, time.monotonic()) and step not in args.skip_save:
            saved.append(step)
            ckpt.save_async(
                step,
                model,
                optimizer,
                extra={"lr_schedule": schedule.state_dict(), "data_position": step + 1},
            )

    result = {
        "resumed": None
        if info is None
        else {"step": info.step, "source": info.source, "on_disk": info.on_disk},
        "losses": losses,
        "saved": saved,
    }
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if args.parallel == "ddp":
        torch.save(state, f"{args.out}.rank{rank}.pt")
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result))
    ckpt.close()  # waits for the last save; never returns in the hang test (the test kills us)
    result["status"] = {
        "last_committed_step": ckpt.status().last_committed_step,
        "last_error": ckpt.status().last_error,
    }
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name in (
        "--rank",
        "--world",
        "--port",
        "--steps",
        "--interval-steps",
        "--hang-step",
        "--request-step",
    ):
        parser.add_argument(name, type=int, default=0)
    parser.add_argument("--request-rank", type=int, default=-1)
    parser.add_argument("--skip-save", type=int, nargs="*", default=[])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--dir")
    parser.add_argument("--job")
    parser.add_argument("--out")
    return parser.parse_args(argv)


# ---- the test side ------------------------------------------------------------------------------


class Launcher:
    """Starts one generation of workers (a fresh TCPStore on port 0 each time) in their own process
    groups, so teardown can kill whatever is left."""

    def __init__(self, tmp_path: Path, job: str) -> None:
        self.tmp_path, self.job = tmp_path, job
        self.procs: list[subprocess.Popen] = []
        self.stores: list[dist.TCPStore] = []

    def start(self, world: int, out: str, **options) -> list[subprocess.Popen]:
        store = dist.TCPStore(
            "127.0.0.1", 0, world, True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )
        self.stores.append(store)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs = []
        for rank in range(world):
            argv = [
                sys.executable,
                __file__,
                "--rank",
                str(rank),
                "--world",
                str(world),
                "--port",
                str(store.port),
                "--dir",
                str(self.tmp_path / "ckpt"),
                "--job",
                self.job,
                "--out",
                str(self.tmp_path / out),
            ]
            for key, value in options.items():
                argv += [f"--{key.replace('_', '-')}"] + (
                    [str(v) for v in value] if isinstance(value, list) else [str(value)]
                )
            log = open(self.tmp_path / f"{out}.rank{rank}.log", "w")
            procs.append(
                subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
        self.procs += procs
        return procs

    def wait(self, procs: list[subprocess.Popen], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, proc in enumerate(procs):
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
            if rc != 0:
                log = Path(proc.args[proc.args.index("--out") + 1] + f".rank{rank}.log").read_text()
                raise AssertionError(f"rank {rank} exited {rc}:\n{log[-3000:]}")

    def kill(self, procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def close(self) -> None:
        self.kill(self.procs)
        remove_snapshots(Path("/dev/shm"), self.job)


@pytest.fixture
def launcher(tmp_path):
    job = f"test-{uuid.uuid4().hex[:10]}"
    launch = Launcher(tmp_path, job)
    yield launch
    launch.close()


def _wait_for(paths: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, (
            f"timed out waiting for {[str(p) for p in paths if not p.exists()]}"
        )
        time.sleep(0.02)


def _assert_same_state(a: dict, b: dict, label: str) -> None:
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"{label}: parameter {key} differs"
    for index, per_param in a["optim"]["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, b["optim"]["state"][index][name]), (
                f"{label}: optimizer {index}.{name} differs"
            )
    assert a["optim"]["param_groups"] == b["optim"]["param_groups"], f"{label}: param_groups differ"
    assert torch.equal(a["rng"], b["rng"]), f"{label}: RNG state differs"


N = 3  # steps per half


@pytest.mark.timeout(150)
def test_resume_is_bitwise_and_a_killed_save_loses_nothing(launcher, tmp_path):
    """Generation A trains 2N steps on 2 ranks, saving at N and 2N; the save at 2N hangs mid-write and
    A is SIGKILLed. Then:
    - only step N is listed, intact; the half-written step 2N never is (atomic commit);
    - generation B (new processes, RAM snapshots set aside) resumes from disk at N, trains N more:
      parameters, AdamW state, param_groups and RNG bitwise equal to A's at 2N;
    - generation C (snapshots back) loads A's step 2N from shared memory, bitwise equal again, and
      writes it out, so it is committed and intact afterwards."""
    ckpt_dir = tmp_path / "ckpt"
    storage = LocalDirectoryStorage(ckpt_dir)
    world = 2

    gen_a = launcher.start(world, "a", steps=2 * N, interval_steps=N, hang_step=2 * N)
    _wait_for([tmp_path / f"a.rank{r}.{suffix}" for r in range(world) for suffix in ("pt", "json")], 90)
    _wait_for([tmp_path / "a.hanging"], 30)
    launcher.kill(gen_a)  # SIGKILL, writer mid-save

    assert storage.committed_steps() == [N]
    assert (ckpt_dir / f"step-{2 * N:09d}.tmp").is_dir(), "the killed save's partial files are there..."
    assert find_damage(storage, N) == []
    manifest = Manifest.from_json(storage.read_manifest(N))
    assert (manifest.step, manifest.world_size, manifest.layout) == (N, world, {"dp": world})
    assert manifest.extra["data_position"] == N + 1 and set(manifest.rng_by_rank) == {0, 1}

    # B: a restart on another node (no RAM snapshot) resumes from disk.
    def aside(r: int) -> Path:  # same tmpfs, and still matched by remove_snapshots()
        return Path(f"{snapshot_path(Path('/dev/shm'), launcher.job, r)}.aside")

    for r in range(world):
        snapshot_path(Path("/dev/shm"), launcher.job, r).rename(aside(r))
    gen_b = launcher.start(world, "b", steps=2 * N, interval_steps=N, skip_save=[2 * N])
    launcher.wait(gen_b, 90)
    assert not (ckpt_dir / f"step-{2 * N:09d}.tmp").exists(), "...and resume swept them"
    for r in range(world):
        result = json.loads((tmp_path / f"b.rank{r}.json").read_text())
        assert result["resumed"] == {"step": N, "source": "disk", "on_disk": True}
        _assert_same_state(
            torch.load(tmp_path / f"a.rank{r}.pt"),
            torch.load(tmp_path / f"b.rank{r}.pt"),
            f"rank {r} disk resume",
        )

    # C: a restart on the same node finds A's snapshot of step 2N in RAM.
    for r in range(world):
        aside(r).rename(snapshot_path(Path("/dev/shm"), launcher.job, r))
    gen_c = launcher.start(world, "c", steps=2 * N, interval_steps=N)
    launcher.wait(gen_c, 90)
    for r in range(world):
        result = json.loads((tmp_path / f"c.rank{r}.json").read_text())
        assert result["resumed"] == {"step": 2 * N, "source": "shared_memory", "on_disk": False}
        assert result["status"] == {"last_committed_step": 2 * N, "last_error": None}
        _assert_same_state(
            torch.load(tmp_path / f"a.rank{r}.pt"),
            torch.load(tmp_path / f"c.rank{r}.pt"),
            f"rank {r} RAM resume",
        )
    assert storage.committed_steps() == [N, 2 * N]
    assert find_damage(storage, 2 * N) == []
    # Durable now, so close() freed the RAM.
    assert not any(snapshot_path(Path("/dev/shm"), launcher.job, r).exists() for r in range(world))


@pytest.mark.timeout(150)
def test_resume_reshards_fsdp_dp4_onto_dp2(launcher, tmp_path):
    """Saved by 4 ranks under FSDP2 (each holding a quarter of every parameter and of AdamW's state),
    resumed by 2: DCP reshards on load, and the loss continues as in the uninterrupted dp=4 run.
    The dp=2 run then gets "checkpoint now" on rank 1 only; both ranks save the same next step."""
    gen_a = launcher.start(
        4, "a", steps=2 * N, interval_steps=N, skip_save=[2 * N], parallel="fsdp", dropout=0.0
    )
    launcher.wait(gen_a, 120)
    request_step = N + 1
    gen_b = launcher.start(
        2,
        "b",
        steps=2 * N,
        interval_steps=N,
        skip_save=[2 * N],
        parallel="fsdp",
        dropout=0.0,
        request_step=request_step,
        request_rank=1,
    )
    launcher.wait(gen_b, 90)
    straight = json.loads((tmp_path / "a.rank0.json").read_text())
    resumed = json.loads((tmp_path / "b.rank0.json").read_text())
    assert resumed["resumed"] == {"step": N, "source": "disk", "on_disk": True}
    assert sorted(resumed["losses"]) == [str(s) for s in range(N + 1, 2 * N + 1)]
    for step, loss in resumed["losses"].items():
        # Only the order of floating-point sums changes with the number of ranks.
        assert loss == pytest.approx(straight["losses"][step], rel=1e-5), f"step {step}"
    storage = LocalDirectoryStorage(tmp_path / "ckpt")
    manifest = Manifest.from_json(storage.read_manifest(N))
    assert manifest.world_size == 4 and manifest.layout == {"dp": 4}

    # The request is voted on during the step it arrives in and honoured after the next one.
    for r in range(2):
        assert json.loads((tmp_path / f"b.rank{r}.json").read_text())["saved"] == [request_step + 1]
    assert storage.committed_steps() == [N, request_step + 1]
    manifest = Manifest.from_json(storage.read_manifest(request_step + 1))
    assert manifest.world_size == 2 and manifest.layout == {"dp": 2} and find_damage(storage, N + 2) == []


if __name__ == "__main__":
    worker(_parse(sys.argv[1:]))
