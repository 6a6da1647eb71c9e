"""The job file's network faults, fired by whoever owns the namespaces (the launcher) when the job
reaches their step (`at_step`) or their time since submission (`at_s`): a bandwidth cap, a link down,
a partition, a control-plane cut; each repaired after `duration_s` (0: never). Every fault fired and repaired is logged with its time, so tests and
benchmarks measure detection from the moment the link really changed."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from hyrun.runtime.jobfile import FaultSpec

from .hosts import NetnsHosts
from .links import cap_bandwidth, set_link, uncap

log = logging.getLogger("hyrun.network")

_LINK_OF = {"link_down": "data", "partition": "both", "coordinator_unreachable": "control"}


@dataclass(frozen=True)
class FiredFault:
    kind: str
    node: str
    at_step: int | None
    at_job_s: float  # since the job was submitted, the clock the coordinator's incidents use


class NetworkFaults:
    def __init__(self, hosts: NetnsHosts, faults: list[FaultSpec]) -> None:
        self.hosts = hosts
        network = [f for f in faults if f.is_network]
        self._pending = sorted((f for f in network if f.at_step is not None), key=lambda f: f.at_step)
        self._timed = sorted((f for f in network if f.at_s is not None), key=lambda f: f.at_s)
        self._repairs: list[threading.Timer] = []
        self._lock = threading.Lock()
        self.fired: list[FiredFault] = []
        self.job_started_s = time.monotonic()

    def start(self, job_started_s: float) -> None:
        """The job was submitted at `job_started_s` (monotonic): time-keyed faults count from it."""
        self.job_started_s = job_started_s
        for fault in self._timed:
            timer = threading.Timer(max(0.0, job_started_s + fault.at_s - time.monotonic()), self._fire_locked, args=(fault,))
            timer.daemon = True
            timer.start()
            self._repairs.append(timer)

    def _fire_locked(self, fault: FaultSpec) -> None:
        with self._lock:
            self._fire(fault)

    def on_step(self, step: int) -> None:
        """The job completed `step`: fire the faults due at the start of the next one."""
        with self._lock:
            due = [f for f in self._pending if f.at_step <= step + 1]
            self._pending = [f for f in self._pending if f.at_step > step + 1]
            for fault in due:
                self._fire(fault)

    def _fire(self, fault: FaultSpec) -> None:
        if fault.kind == "link_slow":
            cap_bandwidth(self.hosts, fault.node, fault.mbit)
            repair = lambda: uncap(self.hosts, fault.node)  # noqa: E731
        else:
            link = _LINK_OF[fault.kind]
            set_link(self.hosts, fault.node, link, up=False)
            repair = lambda: set_link(self.hosts, fault.node, link, up=True)  # noqa: E731
        self.fired.append(FiredFault(fault.kind, fault.node, fault.at_step, time.monotonic() - self.job_started_s))
        log.info("network fault %s on node %s at %s%s", fault.kind, fault.node, fault.moment,
                 f" for {fault.duration_s:g} s" if fault.duration_s else " for good")
        if fault.duration_s:
            timer = threading.Timer(fault.duration_s, self._repair, args=(fault, repair))
            timer.daemon = True
            timer.start()
            self._repairs.append(timer)

    def _repair(self, fault: FaultSpec, repair) -> None:
        with self._lock:
            try:
                repair()
                log.info("network fault %s on node %s repaired", fault.kind, fault.node)
            except RuntimeError as error:  # the hosts may be closing: the job is over
                log.warning("could not repair %s on %s: %s", fault.kind, fault.node, error)

    def close(self) -> None:
        for timer in self._repairs:
            timer.cancel()
