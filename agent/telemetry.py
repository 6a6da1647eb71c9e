"""Health samples for the heartbeat. Every source sits behind one small Protocol; the agent asks
them on its heartbeat timer, never on a worker's critical path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import psutil


@dataclass(frozen=True)
class CardSample:
    index: int
    temperature_c: float = 0.0
    slowdown_temperature_c: float = 0.0
    power_w: float = 0.0
    utilization: float = 0.0
    memory_used_bytes: int = 0
    ecc_uncorrected: int = 0
    xid_events: tuple[int, ...] = ()
    throttle_reasons: int = 0


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    net_errors: int = 0
    net_drops: int = 0


class CardTelemetrySource(Protocol):
    def sample(self) -> list[CardSample]: ...


@dataclass
class SimulatedCards:
    """Simulated cards: a steady, healthy temperature unless a test scripts otherwise."""

    indices: list[int]
    temperature_c: dict[int, float] = field(default_factory=dict)

    def sample(self) -> list[CardSample]:
        return [
            CardSample(index=i, temperature_c=self.temperature_c.get(i, 45.0), slowdown_temperature_c=90.0)
            for i in self.indices
        ]


def sample_host() -> HostSample:
    net = psutil.net_io_counters()
    return HostSample(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        net_errors=net.errin + net.errout,
        net_drops=net.dropin + net.dropout,
    )
