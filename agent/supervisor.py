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

Each worker runs in its own process group, so a stop reaches whatever it started; a stop is bounded
(SIGTERM, SIGKILL after STOP_GRACE_S) and each worker's lifecycle is the table in lifecycle.py.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hyrun.agent.lifecycle import LIVE, WorkerLifecycle, WorkerState
from hyrun.common.process import kill_group
from hyrun.common.snapshots import SHM_DIR_ENV, claim_snapshot
from hyrun.proto import hyrun_pb2 as pb

log = logging.getLogger("hyrun.agent")

STOP_GRACE_S = 3.0
KILL_WAIT_S = 2.0  # after SIGKILL: only a process stuck in the kernel (D state) takes longer
# Workers run below the agent's CPU priority. On a loaded host (2 cores, 4 workers importing torch
# and training) an agent at the workers' priority was starved long enough to miss heartbeats, and
# the coordinator declared healthy nodes lost; the agent's own work is small, so it always gets it.
# 5, not more: against other load on the host (nice 0) a worker still gets a third of a core's share.
WORKER_NICE = 5
# A fresh warm process imports torch (seconds of CPU): top the pool up only after a new
# generation has had time to start, or the spares slow down the ranks that matter.
TOP_UP_DELAY_S = 5.0


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    report_fd: int   # read end: the worker's JSON-line reports
    control_fd: int  # write end: assignment, then commands
    generation: int = 0
    rank: int = -1   # the rank it was assigned, -1 while a spare
    card_index: int = -1
    log_path: Path | None = None
    life: WorkerLifecycle = field(default_factory=WorkerLifecycle)


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
        shm_dir: Path = Path("/dev/shm"),
    ) -> None:
        self.node = node
        self.send = send
        self.on_step = on_step  # (card index, step): lets simulated telemetry follow training
        self.warm_target = warm_workers
        self.workers: dict[int, WorkerProcess] = {}  # rank -> process, current generation only
        self.warm: list[WorkerProcess] = []
        self.shm_dir = Path(shm_dir)  # where the workers' RAM snapshots go; the agent owns them
        self._spawned_workers: list[WorkerProcess] = []  # every one not yet reaped: for kill_all_now()
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
            **{SHM_DIR_ENV: str(self.shm_dir)},
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
                process_group=0,  # its own group: a stop signals whatever it started too
            )
        try:
            # Single-threaded still (exec'd, importing): every thread it starts inherits the niceness.
            os.setpriority(os.PRIO_PROCESS, process.pid, WORKER_NICE)
        except OSError as error:
            log.warning("worker pid %d keeps the agent's CPU priority: %s", process.pid, error)
        os.close(report_write)  # the worker holds the only write end: EOF on read means it is gone
        os.close(control_read)
        worker = WorkerProcess(process, report_read, control_write)
        # Replaced, not appended to: kill_all_now() reads it without the lock; reaped ones drop out.
        self._spawned_workers = [w for w in self._spawned_workers if w.life.state is not WorkerState.EXITED] + [worker]
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
                    closed = self._closed
                    if not closed:
                        self.warm.append(worker)
                if closed:  # close() collected the spares while this one was starting
                    self._stop([worker], "agent stopping")

        if self.warm_target > 0:
            self._spawner.submit(fill, delay_s)

    def _take(self) -> WorkerProcess:
        """A spare, now ASSIGNED (a spare that died meanwhile is skipped; none left: a fresh one)."""
        while True:
            with self._lock:
                worker = self.warm.pop(0) if self.warm else None
            if worker is None:
                worker = self._spawner.submit(self._spawn).result()
            if worker.life.move_if(frozenset({WorkerState.SPARE}), WorkerState.ASSIGNED):
                return worker

    @property
    def running_generation(self) -> int:
        """The generation whose workers run here now (0: none)."""
        with self._lock:
            live = [w.generation for w in self.workers.values() if w.process.poll() is None]
        return max(live, default=0)

    # ------------------------------------------------------------------ generations

    def start_generation(self, start: pb.StartGeneration) -> None:
        # The old generation's workers go first (bounded): two generations must never train at once.
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
        job_id = Path(start.run_dir).name
        try:
            claim_snapshot(self.shm_dir, job_id, assignment.rank)  # before the worker can write one
        except OSError as error:
            log.warning("rank %d's RAM snapshot has no owner record (%s): a later agent will not free it", assignment.rank, error)
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
        left = worker.life.move(WorkerState.EXITED)
        reason = describe_returncode(code)
        if left is WorkerState.SPARE or worker.rank < 0:
            if not self._closed:
                log.warning("a spare worker (pid %d) %s", worker.process.pid, reason)
            return
        # The log explains an exit the worker caused itself (an error, an abort from a C++ throw),
        # not a SIGKILL or SIGTERM that came from outside.
        if (code > 0 or code in _SELF_INFLICTED) and not worker.life.stopped_by_agent:
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
        """Stops every worker and every spare, within STOP_GRACE_S + KILL_WAIT_S."""
        with self._lock:
            self._closed = True
            spares, self.warm = self.warm, []
            targets = list(self.workers.values()) + spares
        self._stop(targets, "agent stopping")
        shutil.rmtree(self._spare_logs, ignore_errors=True)  # assigned workers log in the run directory

    def kill_all_now(self) -> None:
        """SIGKILLs every worker's process group at once, waiting for nothing and taking no lock:
        the last resort of an agent that must exit now (see NodeAgent's shutdown watchdog)."""
        for worker in list(self._spawned_workers):
            if worker.life.state is not WorkerState.EXITED:
                kill_group(worker.process.pid, signal.SIGKILL)

    def _stop(self, targets: list[WorkerProcess], reason: str) -> None:
        """SIGTERM to each worker's process group, then SIGKILL to those still there after the grace."""
        live = [w for w in targets if w.life.move_if(LIVE, WorkerState.STOPPING)]
        for worker in live:
            if worker.rank >= 0:
                log.info("stopping rank %d (pid %d): %s", worker.rank, worker.process.pid, reason)
            kill_group(worker.process.pid, signal.SIGTERM)
            kill_group(worker.process.pid, signal.SIGCONT)  # a stopped (hung) worker handles SIGTERM only once resumed
        deadline = time.monotonic() + STOP_GRACE_S
        killed = []
        for worker in live:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if worker.life.move_if(frozenset({WorkerState.STOPPING}), WorkerState.KILLED):
                    log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", worker.process.pid, STOP_GRACE_S)
                    kill_group(worker.process.pid, signal.SIGKILL)
                    killed.append(worker)
        for worker in killed:
            try:
                worker.process.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("pid %d survives SIGKILL (stuck in the kernel?); not waiting for it", worker.process.pid)
        with self._lock:
            for worker in targets:
                if self.workers.get(worker.rank) is worker:
                    del self.workers[worker.rank]
                try:
                    os.close(worker.control_fd)
                except OSError:
                    pass
