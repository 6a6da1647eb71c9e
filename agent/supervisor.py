"""Starts and stops the node's worker processes, one per card, and turns what they do into
messages for the coordinator: a step report per line they write on their report pipe (JSON, never
pickle), and an exit report the moment one exits, with its code or signal and the log to read.

Workers are started *warm*: a pool of processes that have already imported torch and hyrun waits
on their command pipes, and a generation's ranks are handed to them as a one-line JSON assignment.
Measured on the CPU testbed, importing torch and its compiler stack took ~3 s of the ~7 s a
recovered generation needed before its first step; a warm worker skips it.

Every process is started from one long-lived spawner thread: workers ask the kernel to kill them
when that thread dies (PR_SET_PDEATHSIG fires on the death of the parent *thread*), so an agent
that is SIGKILLed leaves no orphans, and a short-lived thread must never start one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hyrun.proto import hyrun_pb2 as pb

log = logging.getLogger("hyrun.agent")

STOP_GRACE_S = 3.0
# A fresh warm process imports torch (seconds of CPU): top the pool up only after a new
# generation has had time to start, or the spares slow down the ranks that matter.
TOP_UP_DELAY_S = 5.0


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    report_fd: int   # read end: the worker's JSON-line reports
    control_fd: int  # write end: assignment, then commands
    generation: int = 0
    rank: int = -1
    card_index: int = -1
    log_path: Path | None = None
    stopping: bool = False

    @property
    def assigned(self) -> bool:
        return self.rank >= 0


def describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


_SELF_INFLICTED = {-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS, -signal.SIGFPE, -signal.SIGILL}
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
    # The worker's own summary ("error: ...") wins over what a crashing teardown prints after it
    # (e.g. "terminate called without an active exception").
    summaries = [line for line in lines if line.startswith("error: ")]
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return (summaries or errors or lines or [""])[-1][:300]


class Spawner:
    """The one thread that starts processes (see the module docstring), fed through a queue."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="spawner").start()

    def _run(self) -> None:
        while True:
            not_before_s, fn, future = self._jobs.get()
            time.sleep(max(0.0, not_before_s - time.monotonic()))
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to whoever waits on the future
                future.set_exception(error)

    def submit(self, fn: Callable, delay_s: float = 0.0) -> Future:
        future: Future = Future()
        self._jobs.put((time.monotonic() + delay_s, fn, future))
        return future


class Supervisor:
    def __init__(
        self,
        node: str,
        send: Callable[[pb.AgentMessage], None],
        on_step: Callable[[int, int], None] = lambda card, step: None,
        warm_workers: int = 0,
    ) -> None:
        self.node = node
        self.send = send
        self.on_step = on_step  # (card index, step): lets simulated telemetry follow training
        self.warm_target = warm_workers
        self.workers: dict[int, WorkerProcess] = {}  # rank -> process, current generation only
        self.warm: list[WorkerProcess] = []
        self._lock = threading.Lock()
        self._spawner = Spawner()
        self._spare_logs = Path(tempfile.mkdtemp(prefix=f"hyrun-agent-{os.getpid()}-"))
        self._spawned = 0
        self._closed = False
        self.top_up(delay_s=0.0)

    # ------------------------------------------------------------------ processes

    def _spawn(self) -> WorkerProcess:
        """A worker that imports everything, then waits for its assignment (spawner thread only)."""
        report_read, report_write = os.pipe()
        control_read, control_write = os.pipe()
        self._spawned += 1
        env = dict(
            os.environ,
            HYRUN_AGENT_PID=str(os.getpid()),
            HYRUN_REPORT_FD=str(report_write),
            HYRUN_CONTROL_FD=str(control_read),
            PYTHONUNBUFFERED="1",
        )
        spare_log = self._spare_logs / f"spare-{self._spawned}.log"
        with open(spare_log, "ab") as out:  # until assigned: the worker then writes to its rank log
            process = subprocess.Popen(
                [sys.executable, "-m", "hyrun.runtime.trainer.worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=(report_write, control_read),
            )
        os.close(report_write)  # the worker holds the only write end: EOF on read means it is gone
        os.close(control_read)
        worker = WorkerProcess(process, report_read, control_write)
        threading.Thread(target=self._forward_reports, args=(worker,), daemon=True, name="reports").start()
        return worker

    def top_up(self, delay_s: float = TOP_UP_DELAY_S) -> None:
        def fill() -> None:
            while not self._closed:
                with self._lock:
                    self.warm = [w for w in self.warm if w.process.poll() is None]
                    if len(self.warm) >= self.warm_target:
                        return
                worker = self._spawn()
                with self._lock:
                    self.warm.append(worker)

        if self.warm_target > 0:
            self._spawner.submit(fill, delay_s)

    def _take(self) -> WorkerProcess:
        with self._lock:
            while self.warm:
                worker = self.warm.pop(0)
                if worker.process.poll() is None:
                    return worker
        return self._spawner.submit(self._spawn).result()

    # ------------------------------------------------------------------ generations

    def start_generation(self, start: pb.StartGeneration) -> None:
        self.stop_all("a new generation starts")
        node_dir = Path(start.run_dir) / f"generation-{start.generation}" / self.node
        node_dir.mkdir(parents=True, exist_ok=True)
        job_path = node_dir / "job.json"
        job_path.write_text(start.job_json)
        for assignment in start.ranks:
            self._assign(start, assignment, node_dir, job_path)
        self.top_up()

    def _assign(self, start: pb.StartGeneration, assignment: pb.RankAssignment, node_dir: Path, job_path: Path) -> None:
        rdv = start.rendezvous
        log_path = node_dir / f"rank-{assignment.rank}.log"
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
            "log_path": str(log_path),
            "layout_json": start.layout_json,
        }
        worker = self._take()
        worker.generation, worker.rank, worker.card_index, worker.log_path = (
            start.generation, assignment.rank, assignment.card_index, log_path,
        )  # fmt: skip
        with self._lock:
            self.workers[assignment.rank] = worker
        os.write(worker.control_fd, (json.dumps({"kind": "assign", "spec": spec}) + "\n").encode())
        log.info("rank %d (card %d) -> pid %d, log %s", worker.rank, worker.card_index, worker.process.pid, log_path)
        self.send(
            pb.AgentMessage(
                worker_started=pb.WorkerStarted(generation=start.generation, rank=worker.rank, pid=worker.process.pid)
            )
        )

    def _forward_reports(self, worker: WorkerProcess) -> None:
        """Forwards reports until the worker closes its pipe, then reports its exit."""
        with os.fdopen(worker.report_fd, "rb") as pipe:
            for line in pipe:
                try:
                    fields = json.loads(line)
                    kind = fields.pop("kind", "step")
                    if kind == "progress":
                        self.send(pb.AgentMessage(progress=pb.RankProgress(**fields)))
                    else:
                        self.send(pb.AgentMessage(step=pb.StepReport(**fields)))
                        self.on_step(worker.card_index, fields["step"])
                except (ValueError, TypeError, KeyError) as error:
                    log.warning("rank %d wrote a bad report line (%s): %r", worker.rank, error, line[:200])
        code = worker.process.wait()
        reason = describe_returncode(code)
        if not worker.assigned:
            if not self._closed:
                log.warning("a spare worker (pid %d) %s", worker.process.pid, reason)
            return
        # The log explains an exit the worker caused itself (an error, an abort from a C++ throw),
        # not a SIGKILL or SIGTERM that came from outside.
        if (code > 0 or code in _SELF_INFLICTED) and not worker.stopping:
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

    def close(self) -> None:
        """Stops every worker and every spare."""
        self._closed = True
        self.stop_all("agent stopping")
        with self._lock:
            spares, self.warm = self.warm, []
        self._stop(spares, "agent stopping")

    def _stop(self, targets: list[WorkerProcess], reason: str) -> None:
        """SIGTERM, then SIGKILL whoever is still there after the grace period."""
        live = [w for w in targets if w.process.poll() is None]
        for worker in live:
            worker.stopping = True
            if worker.assigned:
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
                try:
                    os.close(worker.control_fd)
                except OSError:
                    pass
