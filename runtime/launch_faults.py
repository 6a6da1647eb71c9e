"""Faults the launcher injects from outside the job's processes — the job file's network faults and
signals — when the job reaches their step (`at_step`, heard from the job's events) or their time
since submission (`at_s`, on timers). Each kind's injection is a function passed in (`fire`), which
returns how to repair it after `duration_s` (or None). Every fault fired and repaired is logged with
its time, so tests and benchmarks measure detection from the moment it really happened."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from hyrun.runtime.jobfile import FaultSpec

log = logging.getLogger("hyrun.faults")

Repair = Callable[[], None]


@dataclass(frozen=True)
class FiredFault:
    kind: str
    node: str
    at_step: int | None
    at_job_s: float  # since the job was submitted, the clock the coordinator's incidents use


class LauncherFaults:
    def __init__(self, faults: list[FaultSpec], fire: Callable[[FaultSpec], Repair | None]) -> None:
        outside = [f for f in faults if f.from_outside]
        self._fire_fn = fire
        self._pending = sorted((f for f in outside if f.at_step is not None), key=lambda f: f.at_step)
        self._timed = sorted((f for f in outside if f.at_s is not None), key=lambda f: f.at_s)
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self.fired: list[FiredFault] = []
        self.job_started_s = time.monotonic()

    def start(self, job_started_s: float) -> None:
        """The job was submitted at `job_started_s` (monotonic): time-keyed faults count from it."""
        self.job_started_s = job_started_s
        for fault in self._timed:
            self._later(max(0.0, job_started_s + fault.at_s - time.monotonic()), self._fire_locked, fault)

    def on_step(self, step: int) -> None:
        """The job completed `step`: fire the faults due at the start of the next one."""
        with self._lock:
            due = [f for f in self._pending if f.at_step <= step + 1]
            self._pending = [f for f in self._pending if f.at_step > step + 1]
            for fault in due:
                self._fire(fault)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def _later(self, delay_s: float, fn: Callable, *args) -> None:
        timer = threading.Timer(delay_s, fn, args=args)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _fire_locked(self, fault: FaultSpec) -> None:
        with self._lock:
            self._fire(fault)

    def _fire(self, fault: FaultSpec) -> None:
        try:
            repair = self._fire_fn(fault)
        except (RuntimeError, OSError) as error:  # the target is gone (its card evicted, the job ending)
            log.warning("fault %s on %s at %s not injected: %s", fault.kind, fault.node, fault.moment, error)
            return
        self.fired.append(FiredFault(fault.kind, fault.node, fault.at_step, time.monotonic() - self.job_started_s))
        lasting = f" for {fault.duration_s:g} s" if repair is not None and fault.duration_s else ""
        log.info("fault %s on %s at %s%s", fault.kind, fault.node, fault.moment, lasting)
        if repair is not None and fault.duration_s:
            self._later(fault.duration_s, self._repair, fault, repair)

    def _repair(self, fault: FaultSpec, repair: Repair) -> None:
        with self._lock:
            try:
                repair()
                log.info("fault %s on %s repaired", fault.kind, fault.node)
            except RuntimeError as error:  # the hosts may be closing: the job is over
                log.warning("could not repair %s on %s: %s", fault.kind, fault.node, error)
