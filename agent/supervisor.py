"""Starts and stops the node's worker processes, one per card, and turns what they do into
messages for the coordinator: a step report per line they write on their report pipe (JSON, never
pickle), and an exit report the moment one exits, with its code or signal and the log to read.

Workers are started from the agent's main thread: they ask the kernel to kill them when that
thread's process dies (PR_SET_PDEATHSIG), so an agent that is SIGKILLed leaves no orphans.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hyrun.proto import hyrun_pb2 as pb

log = logging.getLogger("hyrun.agent")

WORKER_SPEC_ENV = "HYRUN_WORKER_SPEC"
STOP_GRACE_S = 3.0


@dataclass
class WorkerProcess:
    generation: int
    rank: int
    card_index: int
    process: subprocess.Popen
    log_path: Path
    control_fd: int  # write end of the pipe the worker reads commands from
    stopping: bool = False


def describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


_ERROR_LINE = re.compile(r"error|exception|what\(\)|terminate called", re.IGNORECASE)


def last_error_line(log_path: Path, max_bytes: int = 4096) -> str:
    """The last line of a worker's log that reads like the error that ended it (a Python
    exception, a C++ `what():`), else its last line: what the coordinator's policy reads to tell
    a rank that failed on its own from one whose peer died under it."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return (errors or lines or [""])[-1][:300]


class Supervisor:
    def __init__(
        self,
        node: str,
        send: Callable[[pb.AgentMessage], None],
        on_step: Callable[[int, int], None] = lambda card, step: None,
    ) -> None:
        self.node = node
        self.send = send
        self.on_step = on_step  # (card index, step): lets simulated telemetry follow training
        self.workers: dict[int, WorkerProcess] = {}  # rank -> process, current generation only
        self._lock = threading.Lock()

    def start_generation(self, start: pb.StartGeneration) -> None:
        self.stop_all("a new generation starts")
        gen_dir = Path(start.run_dir) / f"generation-{start.generation}"
        node_dir = gen_dir / self.node
        node_dir.mkdir(parents=True, exist_ok=True)
        job_path = node_dir / "job.json"
        job_path.write_text(start.job_json)
        for assignment in start.ranks:
            self._start_worker(start, assignment, node_dir, job_path)

    def _start_worker(self, start: pb.StartGeneration, assignment: pb.RankAssignment, node_dir: Path, job_path: Path) -> None:
        rdv = start.rendezvous
        spec = {
            "generation": start.generation,
            "rank": assignment.rank,
            "world_size": rdv.world_size,
            "store_host": rdv.store_host,
            "store_port": rdv.store_port,
            "key_prefix": rdv.key_prefix,
            "backend": rdv.backend,
            "node": self.node,
            "card_index": assignment.card_index,
            "speed": assignment.speed,
            "micro_batches": assignment.micro_batches,
            "micro_batch_offset": assignment.micro_batch_offset,
            "job_path": str(job_path),
            "run_dir": start.run_dir,
            "parent_pid": os.getpid(),
        }
        read_fd, write_fd = os.pipe()
        control_read_fd, control_write_fd = os.pipe()
        spec["report_fd"] = write_fd
        spec["control_fd"] = control_read_fd
        env = dict(os.environ, **{WORKER_SPEC_ENV: json.dumps(spec), "PYTHONUNBUFFERED": "1"})
        log_path = node_dir / f"rank-{assignment.rank}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "hyrun.runtime.trainer.worker"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=(write_fd, control_read_fd),
            )
        os.close(write_fd)  # the worker holds the only write end: EOF on read means it is gone
        os.close(control_read_fd)
        worker = WorkerProcess(
            start.generation, assignment.rank, assignment.card_index, process, log_path, control_write_fd
        )
        with self._lock:
            self.workers[assignment.rank] = worker
        log.info("started rank %d (card %d) as pid %d, log %s", worker.rank, worker.card_index, process.pid, log_path)
        self.send(pb.AgentMessage(worker_started=pb.WorkerStarted(generation=start.generation, rank=worker.rank, pid=process.pid)))
        threading.Thread(target=self._forward_reports, args=(worker, read_fd), daemon=True, name=f"reports-{worker.rank}").start()

    def _forward_reports(self, worker: WorkerProcess, read_fd: int) -> None:
        """Forwards step reports until the worker closes its pipe, then reports its exit."""
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                try:
                    fields = json.loads(line)
                    kind = fields.pop("kind", "step")
                    if kind == "progress":
                        self.send(pb.AgentMessage(progress=pb.RankProgress(**fields)))
                    else:
                        self.send(pb.AgentMessage(step=pb.StepReport(**fields)))
                        self.on_step(worker.card_index, fields["step"])
                except (ValueError, TypeError) as error:
                    log.warning("rank %d wrote a bad report line (%s): %r", worker.rank, error, line[:200])
        code = worker.process.wait()
        reason = describe_returncode(code)
        if code != 0 and not worker.stopping:
            detail = last_error_line(worker.log_path)
            reason = f"{reason}: {detail}" if detail else reason
        log.info("rank %d %s", worker.rank, reason)
        self.send(
            pb.AgentMessage(
                worker_exit=pb.WorkerExit(
                    generation=worker.generation,
                    rank=worker.rank,
                    card_index=worker.card_index,
                    exit_code=code,
                    reason=reason,
                    log_path=str(worker.log_path),
                )
            )
        )

    def send_control(self, generation: int, command: dict) -> None:
        """Writes a command line to every worker of `generation` (a dead one is skipped)."""
        with self._lock:
            targets = [w for w in self.workers.values() if w.generation == generation]
        line = (json.dumps(command) + "\n").encode()
        for worker in targets:
            try:
                os.write(worker.control_fd, line)
            except OSError as error:
                log.warning("could not tell rank %d %s: %s", worker.rank, command.get("kind"), error)

    def stop_generation(self, generation: int, reason: str) -> None:
        with self._lock:
            targets = [w for w in self.workers.values() if w.generation <= generation]
        self._stop(targets, reason)

    def stop_all(self, reason: str) -> None:
        with self._lock:
            targets = list(self.workers.values())
        self._stop(targets, reason)

    def _stop(self, targets: list[WorkerProcess], reason: str) -> None:
        """SIGTERM, then SIGKILL whoever is still there after the grace period."""
        live = [w for w in targets if w.process.poll() is None]
        for worker in live:
            worker.stopping = True
            log.info("stopping rank %d (pid %d): %s", worker.rank, worker.process.pid, reason)
            worker.process.terminate()
            worker.process.send_signal(signal.SIGCONT)  # a stopped (hung) worker handles SIGTERM only once resumed
        for worker in live:
            try:
                worker.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        with self._lock:
            for worker in targets:
                if self.workers.get(worker.rank) is worker:
                    del self.workers[worker.rank]
                    os.close(worker.control_fd)
