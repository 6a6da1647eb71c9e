"""The background threads that take one save from staging to commit while training goes on.

Threads, not a process: they die with their worker, which is acceptable because what they were writing
is in the shared-memory snapshot (which survives) and nothing half-written is ever published.

Two threads, because the two halves want different priorities: the staging copy is what the trainer's
fence waits for, so it runs at the trainer's priority; persisting (serializing, hashing, writing) only
has to finish before the next save, so it runs niced and takes the cores only when training leaves
them idle, instead of preempting the trainer's threads (on a small CPU host a third runnable thread
stretches every collective and OpenMP barrier of the step). Threads started while persisting (DCP's
I/O threads) inherit the nice value.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Raises the calling thread's nice value by `nice` (Linux: per thread); best effort elsewhere."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        thread_id = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + nice))
    except OSError as exc:
        log.warning("could not lower the checkpoint writer's priority: %s", exc)


class BackgroundWriter:
    """Runs one job at a time: `stage` (the host copy), then `persist` (files, manifest, commit) on a
    thread niced by `persist_nice`. `staged` is signalled between the two, so the trainer's fence waits
    only for the copy."""

    def __init__(self, name: str, *, persist_nice: int = 0) -> None:
        self._stage_jobs: queue.Queue[tuple[Callable[[], None], Callable[[], None]] | None] = queue.Queue()
        self._persist_jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._staged = threading.Event()
        self._idle = threading.Event()
        self._staged.set()
        self._idle.set()
        self._persist_nice = persist_nice
        self._stage_thread = threading.Thread(target=self._run_stage, name=f"{name}-stage", daemon=True)
        self._persist_thread = threading.Thread(target=self._run_persist, name=f"{name}-persist", daemon=True)
        self._stage_thread.start()
        self._persist_thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, stage: Callable[[], None], persist: Callable[[], None]) -> None:
        if self.busy:
            raise RuntimeError("submit while a save is in flight: wait() first")
        self._staged.clear()
        self._idle.clear()
        self._stage_jobs.put((stage, persist))

    def wait_staged(self, timeout_s: float | None = None) -> bool:
        return self._staged.wait(timeout_s)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Lets the job in flight finish, then stops the threads; False if they did not in time."""
        self._stage_jobs.put(None)
        self._stage_thread.join(timeout_s)
        self._persist_thread.join(timeout_s)
        return not (self._stage_thread.is_alive() or self._persist_thread.is_alive())

    def _run_stage(self) -> None:
        while (job := self._stage_jobs.get()) is not None:
            stage, persist = job
            try:
                stage()
            except BaseException:  # the job reports its own errors; this is a last resort
                log.exception("checkpoint staging raised")
            finally:
                self._staged.set()
            self._persist_jobs.put(persist)
        self._persist_jobs.put(None)

    def _run_persist(self) -> None:
        lower_thread_priority(self._persist_nice)
        while (persist := self._persist_jobs.get()) is not None:
            try:
                persist()
            except BaseException:
                log.exception("checkpoint persist raised")
            finally:
                self._idle.set()
