"""How long a checkpoint stops training: torch.save (blocking), DCP save, DCP async_save and hyrun's
Checkpointer, on the same model and AdamW state, in one run, printed as ratios against torch.save.

    python benchmarks/checkpoint_stall.py                          # CPU, 0.4 GB of state, about a minute
    python benchmarks/checkpoint_stall.py --state-gb 1              # the README's figure
    python benchmarks/checkpoint_stall.py --device cuda --state-gb 6

Figures per save (median over --saves):
  stall      time the training thread is blocked by the checkpoint: the save call, plus, for hyrun,
             the fence before the next optimizer step (on CUDA the fence only queues a stream wait, so
             the stall there is measured on the step times, see `window`)
  window     wall time of the steps from the save until it is durable, minus as many undisturbed steps:
             the stall plus what background writing costs the steps that run beside it
  durable    from the save call until the checkpoint is on disk (fsynced; committed for hyrun)
  load       back into the model and optimizer (files are in the page cache: this is not a cold read)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hyrun.common.snapshots import remove_snapshots
from hyrun.runtime.checkpoint.checkpointer import Checkpointer
from hyrun.runtime.checkpoint.settings import CheckpointSettings

ADAMW_TENSORS_PER_PARAM = 3  # parameter, exp_avg, exp_avg_sq


@dataclass
class Figures:
    stall_s: list[float]
    window_s: list[float]
    durable_s: list[float]
    load_s: float


class Trainer:
    """A stack of square linear layers sized to hold `state_gb` of parameters + AdamW state."""

    def __init__(self, state_gb: float, device: str, batch: int) -> None:
        width = 4096 if device == "cuda" else 1024
        layer_bytes = ADAMW_TENSORS_PER_PARAM * 4 * width * width
        layers = max(1, round(state_gb * 1e9 / layer_bytes))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            *[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]
        ).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, width, device=device)
        self.device = device
        self.state_bytes = layers * layer_bytes
        self.fence: Callable[[], None] = lambda: None
        self.fence_s = 0.0  # time spent waiting in fence(): training blocked by a checkpoint
        self.step()  # AdamW's state exists from the first step on

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self) -> None:
        self.model(self.x).square().mean().backward()
        start = time.perf_counter()
        self.fence()
        self.fence_s += time.perf_counter() - start
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def step_time_s(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def fsync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb+") as stream:
                os.fsync(stream.fileno())


def measure(
    trainer: Trainer,
    saves: int,
    min_steps: int,
    save: Callable[[int], Callable[[], bool]],
    blocked_s: Callable[[], float],
) -> tuple[list, list, list]:
    """`save(i)` starts save i and returns `durable()`; blocked_s() is the training thread's time in
    checkpoint calls other than the save call itself (hyrun's fence). Save 0 is a warm-up (it allocates
    buffers and fills caches) and is not counted. Each save is compared with undisturbed steps timed
    just before it, so that load from other processes on the host drifts out."""
    stalls, windows, durables = [], [], []
    for i in range(saves + 1):
        baseline_step_s = trainer.step_time_s(2)
        before_blocked = blocked_s()
        start = time.perf_counter()
        durable = save(i)
        call_s = time.perf_counter() - start
        steps = 0
        durable_at = time.perf_counter() if durable() else None  # the blocking ones are durable already
        while steps < min_steps or durable_at is None:
            trainer.step()
            steps += 1
            if durable_at is None and durable():
                durable_at = time.perf_counter()
        trainer.sync()
        if i > 0:
            stalls.append(call_s + blocked_s() - before_blocked)
            windows.append(time.perf_counter() - start - steps * baseline_step_s)
            durables.append(durable_at - start)
    return stalls, windows, durables


def bench_torch_save(trainer, folder, saves, min_steps, io_threads) -> Figures:
    path = folder / "torch_save.pt"

    def save(_i):
        torch.save({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()}, path)
        fsync_tree(path)  # durable, as the others are
        return lambda: True

    figures = measure(trainer, saves, min_steps, save, lambda: 0.0)
    start = time.perf_counter()
    state = torch.load(path, map_location=trainer.device)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optim"])
    return Figures(*figures, time.perf_counter() - start)


def _dcp_load(trainer, path) -> float:
    start = time.perf_counter()
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        trainer.model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return time.perf_counter() - start


def bench_dcp(trainer, folder, saves, min_steps, io_threads) -> Figures:
    def save(i):
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        writer = dcp.FileSystemWriter(folder / f"dcp-{i}", thread_count=io_threads)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        return lambda: True

    figures = measure(trainer, saves, min_steps, save, lambda: 0.0)
    return Figures(*figures, _dcp_load(trainer, folder / f"dcp-{saves}"))


def bench_dcp_async(trainer, folder, saves, min_steps, io_threads) -> Figures:
    futures = []

    def save(i):
        model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
        # Returns once the state is copied to host memory; the writing goes on in a thread.
        writer = dcp.FileSystemWriter(folder / f"dcp-async-{i}", thread_count=io_threads)
        result = dcp.async_save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        future = getattr(result, "upload_completion", result)
        futures.append(future)
        return future.done

    figures = measure(trainer, saves, min_steps, save, lambda: 0.0)
    for future in futures:
        future.result()
    return Figures(*figures, _dcp_load(trainer, folder / f"dcp-async-{saves}"))


def bench_hyrun(trainer, folder, saves, min_steps, io_threads, shm_dir, writer_nice) -> tuple[Figures, float]:
    job = f"bench-{uuid.uuid4().hex[:8]}"
    settings = CheckpointSettings(
        directory=folder / "hyrun",
        keep_last=2,
        io_threads=io_threads,
        shared_memory_dir=shm_dir,
        writer_nice=writer_nice,
    )
    ckpt = Checkpointer(settings, rank=0, world_size=1, job_id=job)
    trainer.fence = ckpt.fence
    committed_at: dict[int, float] = {}
    started_at: dict[int, float] = {}
    stop = threading.Event()

    def watch_commits():  # stamps each commit as it happens, not at the next step boundary
        while not stop.is_set():
            step = ckpt.status().last_committed_step
            if step is not None and step not in committed_at:
                committed_at[step] = time.perf_counter()
            time.sleep(0.005)

    def save(i):
        step = i + 1
        started_at[step] = time.perf_counter()
        ckpt.save_async(step, trainer.model, trainer.optimizer, extra={"data_position": step + 1})
        return lambda: step in committed_at

    watcher = threading.Thread(target=watch_commits, daemon=True)
    watcher.start()
    try:
        stalls, windows, _ = measure(trainer, saves, min_steps, save, lambda: trainer.fence_s)
        ckpt.wait()
        while max(started_at) not in committed_at and ckpt.status().saves_failed == 0:
            time.sleep(0.002)
    finally:
        stop.set()
        watcher.join()
        trainer.fence = lambda: None
    assert ckpt.status().saves_failed == 0, ckpt.status().last_error
    durables = [committed_at[s] - started_at[s] for s in sorted(started_at)[1:]]  # save 0 is the warm-up

    # A restart on the same node: the RAM snapshot (as new as the last checkpoint) wins.
    restarted = Checkpointer(settings, rank=0, world_size=1, job_id=job)
    start = time.perf_counter()
    info = restarted.load_latest(trainer.model, trainer.optimizer)
    ram_load_s = time.perf_counter() - start
    assert info is not None and info.source == "shared_memory", info
    restarted.close()

    # A restart elsewhere: no snapshot for this job id, so hashes are verified and files read.
    elsewhere = Checkpointer(settings, rank=0, world_size=1, job_id=f"{job}-elsewhere")
    start = time.perf_counter()
    info = elsewhere.load_latest(trainer.model, trainer.optimizer)
    disk_load_s = time.perf_counter() - start
    assert info is not None and info.source == "disk", info
    elsewhere.close()
    ckpt.close()  # durable, so this frees the RAM snapshot
    remove_snapshots(settings.shared_memory_dir, job)
    return Figures(stalls, windows, durables, disk_load_s), ram_load_s


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--state-gb",
        type=float,
        default=None,
        help="parameters + AdamW state (default 0.4 on CPU, 6 on CUDA)",
    )
    parser.add_argument(
        "--saves", type=int, default=2, help="saves per method after one warm-up (median reported)"
    )
    parser.add_argument("--min-steps", type=int, default=2, help="steps measured after each save, at least")
    parser.add_argument(
        "--io-threads",
        type=int,
        default=None,
        help="files written and hashed in parallel (default 1 on CPU, 8 on CUDA)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="rows per step (default 32 on CPU; 4096 on CUDA, a step long enough to hide the copy)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the training steps (default: torch's own, one per core)",
    )
    parser.add_argument(
        "--writer-nice",
        type=int,
        default=CheckpointSettings.writer_nice,
        help="hyrun's writer_nice setting (0: the writer at the trainer's priority)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: the system's temporary folder)"
    )
    parser.add_argument(
        "--shm-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="tmpfs for hyrun's snapshot (needs the state's size)",
    )
    args = parser.parse_args(argv)
    state_gb = args.state_gb if args.state_gb is not None else (6.0 if args.device == "cuda" else 0.4)
    batch = args.batch if args.batch is not None else (4096 if args.device == "cuda" else 32)
    io_threads = args.io_threads if args.io_threads is not None else (8 if args.device == "cuda" else 1)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    folder = Path(tempfile.mkdtemp(prefix="hyrun-ckpt-bench-", dir=args.dir))
    try:
        trainer = Trainer(state_gb, args.device, batch)
        base = trainer.step_time_s(3)
        print(
            f"state {trainer.state_bytes / 1e9:.2f} GB on {args.device}, step {base * 1e3:.0f} ms, "
            f"{args.saves} saves per method + 1 warm-up, {torch.get_num_threads()} torch threads, "
            f"{io_threads} I/O threads, hyrun writer_nice {args.writer_nice}, writing to {folder}",
            flush=True,
        )
        results: dict[str, Figures] = {}
        for name, bench in (
            ("torch.save", bench_torch_save),
            ("DCP save", bench_dcp),
            ("DCP async_save", bench_dcp_async),
        ):
            results[name] = bench(trainer, folder, args.saves, args.min_steps, io_threads)
            print(f"  {name} done", flush=True)
        results["hyrun"], ram_load_s = bench_hyrun(
            trainer, folder, args.saves, args.min_steps, io_threads, args.shm_dir, args.writer_nice
        )
        report(results, ram_load_s)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict[str, Figures], ram_load_s: float) -> None:
    """One row per method: each figure in seconds, then as a ratio against torch.save ("x ts")."""
    ref = results["torch.save"]

    def cells(seconds: float | None, ref_seconds: float) -> str:
        return f"{'':>20}" if seconds is None else f"{seconds:>12.3f}{seconds / ref_seconds:>8.3f}"

    columns = ("stall", "window", "durable", "load")
    print("\n" + f"{'method':<16}" + "".join(f"{c + ' s':>12}{'x ts':>8}" for c in columns))
    refs = [statistics.median(ref.stall_s), statistics.median(ref.window_s), statistics.median(ref.durable_s)]
    refs.append(ref.load_s)
    for name, f in results.items():
        figures = [
            statistics.median(f.stall_s),
            statistics.median(f.window_s),
            statistics.median(f.durable_s),
        ]
        figures.append(f.load_s)
        print(f"{name:<16}" + "".join(cells(x, r) for x, r in zip(figures, refs, strict=True)))
    print(
        f"{'hyrun from RAM':<16}"
        + "".join(cells(x, r) for x, r in zip([None] * 3 + [ram_load_s], refs, strict=True))
    )
    hyrun, dcp_sync = results["hyrun"], results["DCP save"]
    print(
        f"\nhyrun window / torch.save window = "
        f"{statistics.median(hyrun.window_s) / refs[1]:.2f} (goal <= 0.5)"
        f"\nhyrun durable / DCP save durable = "
        f"{statistics.median(hyrun.durable_s) / statistics.median(dcp_sync.durable_s):.2f} (goal <= 1)"
        f"\nhyrun stall / torch.save stall = {statistics.median(hyrun.stall_s) / refs[0]:.1%} (goal <= 5%)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
