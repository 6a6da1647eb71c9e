"""Health samples for the heartbeat. Every source sits behind one small Protocol; the agent asks
them on its heartbeat timer, never on a worker's critical path."""

from __future__ import annotations

import time
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


TELEMETRY_FAULTS = ("temperature_ramp", "xid", "ecc")

# NVML's clocks-event (throttle) reason bits a simulated card can show: a card at or above its
# slowdown temperature is thermally throttled, as a real one would be.
THROTTLE_SW_THERMAL, THROTTLE_HW_THERMAL = 0x20, 0x40
_BUSY_WINDOW_S = 5.0  # a card whose worker completed a step this recently counts as busy
_IDLE_POWER_W, _BUSY_POWER_W = 60.0, 300.0  # plausible figures, so dashboards have a shape to show
_SHUTDOWN_ABOVE_SLOWDOWN_C = 10.0  # a ramp stops here: a real card shuts down rather than go on heating


@dataclass
class SimulatedCards:
    """Simulated cards: a steady, healthy temperature, unless the job scripts a fault (the job
    file's `faults` with kind temperature_ramp, xid or ecc), which starts when the card's worker
    reaches the fault's step. A card whose worker stepped in the last few seconds reads busy (full
    utilization, a busy card's power); one at or above its slowdown temperature reads thermally
    throttled, as NVML would say. Heat outlives the generation that scripted it: when the next
    generation's faults replace a ramp, the card cools from where it was at `cooling_c_per_s`
    instead of reading cold at once, so a card that got hot is seen hot however fast the job moved on."""

    indices: list[int]
    base_temperature_c: float = 45.0
    slowdown_temperature_c: float = 90.0
    cooling_c_per_s: float = 1.0
    faults: list[dict] = field(default_factory=list)
    _started_s: dict[int, float] = field(default_factory=dict)  # fault number -> when it fired
    _last_step_s: dict[int, float] = field(default_factory=dict)  # card -> when its worker last stepped
    _reported: set[int] = field(default_factory=set)            # one-shot faults already sent
    _cooling: dict[int, tuple[float, float]] = field(default_factory=dict)  # card -> (°C, since when)

    def script(self, faults: list[dict], now_s: float | None = None) -> None:
        now_s = time.monotonic() if now_s is None else now_s
        self._cooling = {index: (self._temperature(index, now_s), now_s) for index in self.indices}
        self.faults = [f for f in faults if f.get("kind") in TELEMETRY_FAULTS]
        self._started_s.clear()
        self._reported.clear()

    def _temperature(self, index: int, now_s: float) -> float:
        carried_c, since_s = self._cooling.get(index, (self.base_temperature_c, now_s))
        temperature = max(self.base_temperature_c, carried_c - self.cooling_c_per_s * max(0.0, now_s - since_s))
        for number, fault in enumerate(self.faults):
            if fault["kind"] == "temperature_ramp" and fault.get("card", 0) == index and number in self._started_s:
                temperature += fault.get("c_per_s", 2.0) * (now_s - self._started_s[number])
        return min(temperature, self.slowdown_temperature_c + _SHUTDOWN_ABOVE_SLOWDOWN_C)

    def observe_step(self, card: int, step: int, now_s: float) -> None:
        self._last_step_s[card] = now_s
        for number, fault in enumerate(self.faults):
            if fault.get("card", 0) == card and step >= fault["at_step"] and number not in self._started_s:
                self._started_s[number] = now_s

    def sample(self, now_s: float | None = None) -> list[CardSample]:
        now_s = time.monotonic() if now_s is None else now_s
        samples = []
        for index in self.indices:
            temperature, xids, ecc = self._temperature(index, now_s), [], 0
            for number, fault in enumerate(self.faults):
                if fault.get("card", 0) != index or number not in self._started_s:
                    continue
                if fault["kind"] == "ecc":
                    ecc += 1  # a cumulative counter, like NVML's
                elif fault["kind"] == "xid" and number not in self._reported:  # an event: reported once
                    self._reported.add(number)
                    xids.append(int(fault.get("xid", 79)))
            busy = now_s - self._last_step_s.get(index, float("-inf")) <= _BUSY_WINDOW_S
            hot = temperature >= self.slowdown_temperature_c
            samples.append(
                CardSample(
                    index=index,
                    temperature_c=temperature,
                    slowdown_temperature_c=self.slowdown_temperature_c,
                    power_w=_BUSY_POWER_W if busy else _IDLE_POWER_W,
                    utilization=1.0 if busy else 0.0,
                    ecc_uncorrected=ecc,
                    xid_events=tuple(xids),
                    throttle_reasons=(THROTTLE_SW_THERMAL | THROTTLE_HW_THERMAL) if hot else 0,
                )
            )
        return samples


def sample_host() -> HostSample:
    net = psutil.net_io_counters()
    return HostSample(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        net_errors=net.errin + net.errout,
        net_drops=net.dropin + net.dropout,
    )
