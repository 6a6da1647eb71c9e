"""Job-state writes off the coordinator's event loop. The loop hands over the latest document per
key and goes on taking heartbeats; a thread writes them in order. While the store is down (etcd
restarting) writes wait and retry, newer documents replacing older ones for the same key, and the
store catches up when it is back: a slow or absent etcd never stalls the loop or loses the newest
state. A write the store refuses because another coordinator now leads (`Deposed`) is final: the
writer stops and says so, and this coordinator must stop acting."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from hyrun.runtime.coordinator.store import Deposed, Store

log = logging.getLogger("hyrun.coordinator")

_RETRY_PAUSE_S = (0.1, 2.0)  # first and longest pause between tries while the store is down


class StoreUnavailable(ConnectionError):
    """A write that had to be durable before the coordinator went on was not written in time."""


class StoreWriter:
    def __init__(self, store: Store, on_deposed: Callable[[Deposed], None] = lambda error: None) -> None:
        self.store = store
        self.on_deposed = on_deposed
        self._cond = threading.Condition()
        # key -> (newest document not yet written, its ticket, the ticket of the oldest unwritten one)
        self._pending: dict[str, tuple[dict[str, Any], int, int]] = {}
        self._handed = 0  # tickets: one per document handed over, in order
        self.deposed: Deposed | None = None
        self.outage_since_s: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def write(self, key: str, value: dict[str, Any]) -> int:
        """Hands a document over; returns its ticket for `wait` (which raises if deposed)."""
        with self._cond:
            self._handed += 1
            _, _, since = self._pending.pop(key, (None, 0, self._handed))  # re-inserted last: in order of change
            self._pending[key] = (value, self._handed, since)
            self._cond.notify_all()
            return self._handed

    def _done_upto(self) -> int:
        """Every ticket up to this one is written (or superseded by a newer document, also written)."""
        return min((since for _, _, since in self._pending.values()), default=self._handed + 1) - 1

    def wait(self, ticket: int, timeout_s: float) -> None:
        """Returns once the document with this ticket (or a newer one for its key) is in the store."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._done_upto() < ticket:
                if self.deposed is not None:
                    raise self.deposed
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailable(f"the job-state store did not take a write in {timeout_s:.0f} s")
                self._cond.wait(left)

    def write_through(self, key: str, value: dict[str, Any], timeout_s: float) -> None:
        self.wait(self.write(key, value), timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Writes what is pending (for up to `timeout_s`), then stops."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while self._pending and self.deposed is None and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        pause_s = _RETRY_PAUSE_S[0]
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = next(iter(self._pending))
                value, _, _ = self._pending[key]
            try:
                self.store.put(key, value)
            except Deposed as error:
                log.error("%s: this coordinator stops writing", error)
                with self._cond:
                    self.deposed = error
                    self._cond.notify_all()
                self.on_deposed(error)
                return
            except (ConnectionError, OSError) as error:
                if self.outage_since_s is None:
                    self.outage_since_s = time.monotonic()
                    log.warning("job-state store unreachable (%s); the coordinator carries on and retries", error)
                time.sleep(pause_s)
                pause_s = min(2 * pause_s, _RETRY_PAUSE_S[1])
                continue
            pause_s = _RETRY_PAUSE_S[0]
            with self._cond:
                newer, ticket, _ = self._pending[key]
                if newer is value:
                    del self._pending[key]
                else:  # changed while it was written: only the newest document is still owed
                    self._pending[key] = (newer, ticket, ticket)
                if self.outage_since_s is not None and not self._pending:
                    log.info("job-state store caught up after %.1f s", time.monotonic() - self.outage_since_s)
                    self.outage_since_s = None
                self._cond.notify_all()
