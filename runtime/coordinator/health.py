"""What the coordinator knows about each card's health and each rank's recent steps, fed by
heartbeats and step reports (ingest only: decide.py judges it). Recent samples only: a bounded
window per card."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.jobfile import HealthSection
from hyrun.runtime.coordinator.view import CardHealthView, NicSampleView

_TEMPERATURE_SAMPLES = 30
_NIC_SAMPLES = 30


@dataclass
class CardHealth:
    temperatures: deque = field(default_factory=lambda: deque(maxlen=_TEMPERATURE_SAMPLES))  # (t_s, °C)
    slowdown_c: float = 0.0
    ecc_uncorrected: int | None = None  # last cumulative count seen
    ecc_new: int = 0
    xids: list[int] = field(default_factory=list)

    def view(self) -> CardHealthView:
        return CardHealthView(tuple(self.temperatures), self.slowdown_c, self.ecc_new, tuple(self.xids))


class HealthBook:
    def __init__(self, settings: HealthSection) -> None:
        self.settings = settings
        self.cards: dict[CardRef, CardHealth] = {}
        self.nonfinite_by_step: dict[int, dict[int, bool]] = {}  # current generation only
        self.seconds_per_micro_batch: dict[CardRef, list[float]] = {}  # current generation only
        self.data_nics: dict[str, deque] = {}  # node -> recent NicSampleView, oldest first

    def ingest_heartbeat(self, node: str, heartbeat: pb.Heartbeat, now_s: float) -> None:
        for sample in heartbeat.cards:
            health = self.cards.setdefault(CardRef(node, sample.index), CardHealth())
            health.temperatures.append((now_s, sample.temperature_c))
            health.slowdown_c = sample.slowdown_temperature_c
            if health.ecc_uncorrected is not None and sample.ecc_uncorrected > health.ecc_uncorrected:
                health.ecc_new += sample.ecc_uncorrected - health.ecc_uncorrected
            health.ecc_uncorrected = sample.ecc_uncorrected
            health.xids.extend(sample.xid_events)
        if heartbeat.host.HasField("data_nic"):
            nic = heartbeat.host.data_nic
            self.data_nics.setdefault(node, deque(maxlen=_NIC_SAMPLES)).append(NicSampleView(
                now_s, nic.interface, nic.carrier, nic.tx_bytes, nic.queue_overlimits, nic.queue_backlog_bytes,
                nic.rdma_tx_bytes, nic.rdma_xmit_wait))

    def forget(self, card: CardRef) -> None:
        """A card leaves the job: its evidence must not fire again if it is ever readmitted."""
        self.cards.pop(card, None)

    def record_compute(self, card: CardRef, compute_s: float, micro_batches: float) -> None:
        """`micro_batches`: the work the rank did in whole-model micro-batches (a pipeline stage
        holding a quarter of the layers did a quarter of one per micro-batch)."""
        if compute_s > 0 and micro_batches > 0:
            window = self.seconds_per_micro_batch.setdefault(card, [])
            window.append(compute_s / micro_batches)
            del window[: -self.settings.straggler_window_steps]

    def record_step(self, rank: int, step: int, nonfinite_grads: int) -> None:
        self.nonfinite_by_step.setdefault(step, {})[rank] = nonfinite_grads > 0
        for old in [s for s in self.nonfinite_by_step if s <= step - 2 * self.settings.overflow_window_steps]:
            del self.nonfinite_by_step[old]

    def completed_nonfinite(self, world_size: int) -> dict[int, dict[int, bool]]:
        """Only steps every rank has reported: a half-reported step would single out the ranks that
        happened to report first."""
        return {s: dict(r) for s, r in self.nonfinite_by_step.items() if len(r) == world_size}

    def new_generation(self) -> None:
        self.nonfinite_by_step.clear()
        self.seconds_per_micro_batch.clear()
