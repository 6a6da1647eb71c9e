"""Heartbeats that come through relays: a RelayBatch goes into the card arrays in one call (a few
vector writes), membership hears of its nodes, and the running job's nodes also reach the HealthBook
(decide()'s temperature, ECC, XID and link rules read it). Also the relays' liveness, and the node
liveness check between jobs (during a job decide() owns it, with its mass-silence hold).
"""

from __future__ import annotations

import logging
import numpy as np

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.card_metrics import CardCollector
from hyrun.runtime.coordinator.actions import Cause, Evidence, MarkNodeLost
from hyrun.runtime.coordinator.card_arrays import CardColumns, DelayHistogram
from hyrun.runtime.coordinator.membership import Membership
from hyrun.runtime.coordinator.relays import RelayBook

log = logging.getLogger("hyrun.coordinator")


def batch_columns(batch: pb.RelayBatch) -> CardColumns:
    return CardColumns(
        np.asarray(batch.card_index, np.int64), np.asarray(batch.temperature_c, np.float64),
        np.asarray(batch.slowdown_temperature_c, np.float64), np.asarray(batch.power_w, np.float64),
        np.asarray(batch.utilization, np.float64), np.asarray(batch.memory_used_bytes, np.int64),
        np.asarray(batch.ecc_uncorrected, np.int64), np.asarray(batch.throttle_reasons, np.int64),
    )  # fmt: skip


def node_heartbeat(batch: pb.RelayBatch, position: int, first_card: int) -> pb.Heartbeat:
    """One node of a batch as the Heartbeat its agent would have sent (for the HealthBook)."""
    cards = [
        pb.CardTelemetry(index=batch.card_index[i], temperature_c=batch.temperature_c[i],
                         slowdown_temperature_c=batch.slowdown_temperature_c[i], power_w=batch.power_w[i],
                         utilization=batch.utilization[i], memory_used_bytes=batch.memory_used_bytes[i],
                         ecc_uncorrected=batch.ecc_uncorrected[i], throttle_reasons=batch.throttle_reasons[i])
        for i in range(first_card, first_card + batch.card_counts[position])
    ]  # fmt: skip
    for x in batch.xids:
        if x.position == position:
            next(c for c in cards if c.index == x.card_index).xid_events.extend(x.xids)
    host = next((h.host for h in batch.hosts if h.position == position), None)
    return pb.Heartbeat(sequence=batch.sequences[position], cards=cards, host=host)


class RelayIngest:
    def __init__(
        self,
        *,
        cards: CardCollector,
        membership: Membership,
        orchestrator,
        heartbeat_timeout_s: float,
        fan_in: int,
    ) -> None:
        self.cards = cards
        self.membership = membership
        self.orchestrator = orchestrator
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # A relay silent for half a lease is dead: its nodes must learn before their own lease ends.
        self.book = RelayBook(fan_in=fan_in, silence_s=heartbeat_timeout_s / 2)
        self.delays = DelayHistogram()   # node's send -> stored in the arrays, wall clock
        self._streams: dict[str, object] = {}  # relay -> its live stream's token
        self._job_nodes: tuple[object, frozenset[str]] = (None, frozenset())

    # ---- relays' streams ---------------------------------------------------------------------

    def opened(self, relay: str, address: str, token: object, now_s: float) -> None:
        self._streams[relay] = token
        self.book.offered(relay, address, now_s)
        log.info("relay %s offered at %s", relay, address or "(no address)")

    def closed(self, relay: str, token: object, now_s: float) -> None:
        if self._streams.get(relay) is token:  # not a stream the relay has already replaced
            del self._streams[relay]
            self._relay_died(relay, "its stream closed", now_s)

    def _relay_died(self, relay: str, why: str, now_s: float) -> None:
        nodes = self.book.died(relay)
        # Not their fault: their silence counts from now, and they fall back within a beat or two.
        self.cards.arrays.extend_lease(nodes, now_s)
        for name in nodes:
            node = self.membership.nodes.get(name)
            if node is not None and node.alive:
                node.last_heartbeat_s = max(node.last_heartbeat_s, now_s)
        log.warning("relay %s lost (%s): its %d nodes fall back; their silence counts from now", relay, why, len(nodes))

    # ---- batches -----------------------------------------------------------------------------

    def batch(self, batch: pb.RelayBatch, now_s: float, now_unix_s: float) -> None:
        if batch.relay in self.book.dead:  # found silent, yet its stream lives: it was only slow
            self.book.offered(batch.relay, batch.relay_address, now_s)
        nodes = list(batch.nodes)
        xids = [(nodes[x.position], x.card_index, list(x.xids)) for x in batch.xids]
        self.cards.ingest_batch(nodes, batch.sequences, batch.card_counts, batch_columns(batch), xids, now_s)
        self.delays.add(now_unix_s - np.asarray(batch.sent_unix_s, np.float64))
        self.book.batch(batch.relay, nodes, now_s)
        beat = self.membership.heartbeat
        for name in nodes:
            beat(name, now_s)
        self._to_health_book(batch, nodes, now_s)

    def _to_health_book(self, batch: pb.RelayBatch, nodes: list[str], now_s: float) -> None:
        job = self.orchestrator.job
        health = self.orchestrator.health
        if job is None or job.ended or health is None:
            return
        if self._job_nodes[0] is not job:  # a job's own nodes: small next to the fleet, cached per job
            self._job_nodes = (job, frozenset(n.name for n in job.spec.cluster.nodes))
        in_job = self._job_nodes[1]
        first_card = np.concatenate(([0], np.cumsum(batch.card_counts)[:-1])) if nodes else ()
        for position, name in enumerate(nodes):
            if name in in_job:
                health.ingest_heartbeat(name, node_heartbeat(batch, position, int(first_card[position])), now_s)

    # ---- the coordinator's timer -------------------------------------------------------------

    def tick(self, now_s: float) -> None:
        for relay in self.book.silent(now_s):
            self._streams.pop(relay, None)
            self._relay_died(relay, f"no batch for {self.book.silence_s:.1f} s", now_s)
        job, orch = self.orchestrator.job, self.orchestrator
        if (job is None or job.ended) and now_s - orch.stalled_until_s > self.heartbeat_timeout_s:
            arrays = self.cards.arrays
            for name in arrays.overdue(now_s, self.heartbeat_timeout_s):
                node = self.membership.nodes.get(name)
                if node is not None and node.alive:
                    silent_s = now_s - float(arrays.lease_from_s[arrays.node_index[name]])
                    orch.apply(MarkNodeLost(name, Evidence.of(Cause.NODE_SILENT, node=name, silent_s=silent_s)), now_s)
