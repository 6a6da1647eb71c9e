"""The relay tier's two rpcs (proto: Coordinator.Relay and Coordinator.Route), mixed into the
coordinator's servicer. Same event loop as Connect, so no locks; the servicer owns `self.relays`
(a RelayIngest)."""

from __future__ import annotations

import time

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.relay_ingest import RelayIngest
from hyrun.runtime.coordinator.relays import relay_phase_s


class RelayHandlers:
    relays: RelayIngest
    settings: object  # CoordinatorSettings (its heartbeat_interval_s)
    metrics: object   # CoordinatorMetrics

    async def Relay(self, request_iterator, context):
        """One relay's batches in, one reply per stored batch out. The stream ending is the relay's
        death as far as its nodes' leases go (RelayIngest.closed)."""
        relay, token = None, object()
        try:
            async for batch in request_iterator:
                now = time.monotonic()
                if relay is None:
                    relay = batch.relay
                    self.relays.opened(relay, batch.relay_address, token, now)
                self.relays.batch(batch, now, time.time())
                self.metrics.heartbeats_total.inc(len(batch.nodes))  # as if each had come on its own stream
                yield pb.RelayReply(batch=batch.batch)
        finally:
            if relay is not None:
                self.relays.closed(relay, token, time.monotonic())

    async def Route(self, request, context):
        relay, address = self.relays.book.route(request.node, request.failed_relay)
        phase_s = relay_phase_s(relay, self.settings.heartbeat_interval_s)
        return pb.RouteReply(relay=relay, relay_address=address, phase_s=phase_s)
