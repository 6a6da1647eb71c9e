"""Worker process entry point (`python -m hyrun.runtime.trainer.worker`), started *warm* by an
agent: it imports torch and hyrun first, then waits on its command pipe for a one-line JSON
assignment (which generation, rank, card, share of the batch, where to log).

It joins its generation's process group through the coordinator's fresh TCPStore under the
generation's key prefix, so nothing a dead generation left behind can reach it, trains, and exits
0. Any exception is printed (the agent forwards its last line to the coordinator) and exits 1.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from hyrun.common.process import die_with_parent
from hyrun.common.snapshots import shared_memory_dir
from hyrun.runtime.parallel.collective_ledger import LEDGER


@dataclass(frozen=True)
class WorkerSpec:
    generation: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    key_prefix: str
    backend: str
    node: str
    card_index: int
    speed: float
    micro_batches: int
    micro_batch_offset: int
    job_path: str
    run_dir: str
    log_path: str
    layout_json: str = ""  # the generation's ParallelLayout; empty: plain data parallelism


def choose_backend(requested: str) -> str:
    import torch

    if requested in ("gloo", "nccl"):
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank_device(backend: str, card_index: int) -> str:
    """Where the rank computes: its GPU (the agent's card index is the NVML index) under NCCL, else the CPU."""
    if backend != "nccl":
        return "cpu"
    import torch

    torch.cuda.set_device(card_index)  # NCCL and init_device_mesh use the current device
    return f"cuda:{card_index}"


def join_process_group(spec: WorkerSpec, timeout_s: float) -> None:
    import torch.distributed as dist

    if ipaddress.ip_address(_resolve(spec.store_host)).is_loopback:
        # gloo otherwise binds to the address the hostname resolves to, which may not route here.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore(
        spec.store_host, spec.store_port, is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    dist.init_process_group(
        backend=choose_backend(spec.backend),
        store=dist.PrefixStore(spec.key_prefix, store),
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _resolve(host: str) -> str:
    import socket

    return socket.gethostbyname(host)


def build_checkpointer(job, spec: WorkerSpec):
    """The rank's checkpointer (a collective: every rank builds it), or None when the job does not
    checkpoint. Checkpoints of a job live in one directory shared by all its generations."""
    if not job.checkpoint.enabled:
        return None
    from hyrun.runtime.checkpoint.checkpointer import Checkpointer
    from hyrun.runtime.checkpoint.settings import CheckpointSettings

    directory = Path(job.checkpoint.directory or Path(spec.run_dir) / "checkpoints")
    settings = CheckpointSettings(
        directory=directory,
        interval_steps=job.checkpoint.interval_steps,
        interval_s=job.checkpoint.interval_s,
        keep_last=job.checkpoint.keep_last,
        shared_memory_dir=shared_memory_dir(),  # the agent's: it frees what the job leaves there
    )
    return Checkpointer(
        settings, rank=spec.rank, world_size=spec.world_size, job_id=Path(spec.run_dir).name,
        layout={"world_size": spec.world_size, **(json.loads(spec.layout_json) if spec.layout_json else {})},
    )  # fmt: skip


def wait_for_assignment(commands) -> WorkerSpec | None:
    """Blocks until the agent assigns this warm worker a rank; None if the agent closed the pipe."""
    for line in commands:
        command = json.loads(line)
        if command.get("kind") == "assign":
            return WorkerSpec(**command["spec"])
    return None


def listen_for_commands(commands, on_checkpoint_now) -> None:
    """Reads the agent's later commands (JSON lines) on a background thread."""
    import threading

    def loop() -> None:
        for line in commands:
            try:
                command = json.loads(line)
            except ValueError:
                continue
            if command.get("kind") == "checkpoint_now":
                logging.info("checkpoint requested by the coordinator")
                on_checkpoint_now()

    threading.Thread(target=loop, daemon=True, name="agent-commands").start()


def log_to(path: str) -> None:
    """From here on, stdout and stderr (tracebacks, C++ aborts included) go to the rank's log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def preload() -> None:
    """Everything a rank needs before its first step that does not depend on its assignment."""
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: ~2 s on first use)

    import hyrun.runtime.checkpoint.checkpointer  # noqa: F401
    import hyrun.runtime.trainer.loop  # noqa: F401

    # One intra-op thread per worker: several simulated cards share this machine's cores, and
    # oversubscription would make speed factors meaningless.
    torch.set_num_threads(int(os.environ.get("HYRUN_WORKER_THREADS", "1")))


def main() -> int:
    die_with_parent(int(os.environ["HYRUN_AGENT_PID"]))  # a SIGKILLed agent leaves no orphan workers
    preload()
    commands = os.fdopen(int(os.environ["HYRUN_CONTROL_FD"]), "rb")
    spec = wait_for_assignment(commands)
    if spec is None:
        return 0  # a spare the agent no longer needs
    log_to(spec.log_path)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(levelname)s %(message)s")
    import torch.distributed as dist

    from hyrun.runtime.jobfile import job_from_json
    from hyrun.runtime.parallel.layout import ParallelLayout
    from hyrun.runtime.trainer.loop import DrainRequest, RankWork, train
    from hyrun.runtime.trainer.reporting import Reporter

    with open(spec.job_path) as f:
        job = job_from_json(f.read())
    reporter = Reporter(int(os.environ["HYRUN_REPORT_FD"]))
    try:
        device = rank_device(choose_backend(spec.backend), spec.card_index)  # before NCCL is set up
        LEDGER.install()  # before any engine binds a collective: FSDP2 and pipelining look them up per call
        join_process_group(spec, job.runtime.rendezvous_timeout_s)
        logging.info(
            "joined generation %d as rank %d of %d on %s card %d (pid %d)%s",
            spec.generation, spec.rank, spec.world_size, spec.node, spec.card_index, os.getpid(),
            f", layout {spec.layout_json}" if spec.layout_json else "",
        )  # fmt: skip
        work = RankWork(
            rank=spec.rank,
            world_size=spec.world_size,
            generation=spec.generation,
            layout=ParallelLayout.from_json(spec.layout_json) if spec.layout_json else None,
            speed=spec.speed,
            node=spec.node,
            card_index=spec.card_index,
            device=device,
            log_dir=str(Path(spec.log_path).parent),
        )
        checkpointer = build_checkpointer(job, spec)
        logging.info("checkpointer ready")
        drain = DrainRequest()
        listen_for_commands(commands, lambda: drain.request(checkpointer))
        train(job, work, reporter, checkpointer, drain)
        logging.info("finished %d steps", job.training.steps)
        return 0
    except Exception as error:
        traceback.print_exc()
        # The exception's own first line: C++ errors append "At:" and frame lines after the message.
        message = (str(error).strip().splitlines() or [""])[0]
        print(f"error: {type(error).__name__}: {message}"[:500], flush=True)
        return 1
    finally:
        reporter.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
