"""The background thread that takes one save from staging to commit while training goes on.

A thread, not a process: it dies with its worker, which is acceptable because what it was writing is
in the shared-memory snapshot (which survives) and nothing half-written is ever published.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundWriter:
    """Runs one job at a time: `stage` (the host copy), then `persist` (files, manifest, commit).
    `staged` is signalled between the two, so the trainer's fence waits only for the copy."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], Callable[[], None]] | None] = queue.Queue()
        self._staged = threading.Event()
        self._idle = threading.Event()
        self._staged.set()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, stage: Callable[[], None], persist: Callable[[], None]) -> None:
        if self.busy:
            raise RuntimeError("submit while a save is in flight: wait() first")
        self._staged.clear()
        self._idle.clear()
        self._jobs.put((stage, persist))

    def wait_staged(self, timeout_s: float | None = None) -> bool:
        return self._staged.wait(timeout_s)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Lets the job in flight finish, then stops the thread; False if it did not in time."""
        self._jobs.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            stage, persist = job
            try:
                stage()
            except BaseException:  # the job reports its own errors; this is a last resort
                log.exception("checkpoint staging raised")
            finally:
                self._staged.set()
            try:
                persist()
            except BaseException:
                log.exception("checkpoint persist raised")
            finally:
                self._idle.set()
