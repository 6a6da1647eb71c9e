"""The heartbeat relay tier, agent side (DESIGN: Scale).

`Relay`: an agent acting as a relay takes its group's heartbeats (NodeRelay.Beat, or in-process
`take`) and forwards each round as ONE columnar RelayBatch on its stream to the coordinator; it
flushes when every node it carries has beaten this round, or `max_wait_s` after the round's first
beat, so batching adds milliseconds, not an interval. A beat is acked back to its node once the
coordinator has stored its batch.

`HeartbeatRoute`: a node's side. It asks the coordinator (Route) where to send heartbeats and sends
them there; `send` returns False when the beat must go on the node's own Connect stream instead:
no relay assigned, or the relay's stream broke or stopped acking (the node then asks for another).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Callable

import grpc

from hyrun.common.security import TlsFiles, add_port, call_metadata, open_channel
from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc

log = logging.getLogger("hyrun.agent.relay")

Ack = Callable[[int], None]  # called with the acked sequence, on the relay's loop


def build_batch(relay: str, address: str, number: int, beats: list[pb.NodeBeat]) -> pb.RelayBatch:
    """Beats as columns (proto RelayBatch): per node, then per card with the nodes' cards in order."""
    batch = pb.RelayBatch(relay=relay, relay_address=address, batch=number)
    nodes, seqs, sent, counts = [], [], [], []
    cols: list[list] = [[] for _ in range(8)]
    for position, beat in enumerate(beats):
        hb = beat.heartbeat
        nodes.append(beat.node)
        seqs.append(hb.sequence)
        sent.append(beat.sent_unix_s)
        counts.append(len(hb.cards))
        for c in hb.cards:
            for col, value in zip(cols, (c.index, c.temperature_c, c.slowdown_temperature_c, c.power_w, c.utilization,
                                         c.memory_used_bytes, c.ecc_uncorrected, c.throttle_reasons)):
                col.append(value)
            if c.xid_events:
                batch.xids.add(position=position, card_index=c.index, xids=c.xid_events)
        if hb.HasField("host"):
            batch.hosts.add(position=position, host=hb.host)
    batch.nodes.extend(nodes)
    batch.sequences.extend(seqs)
    batch.sent_unix_s.extend(sent)
    batch.card_counts.extend(counts)
    for field, col in zip(("card_index", "temperature_c", "slowdown_temperature_c", "power_w", "utilization",
                           "memory_used_bytes", "ecc_uncorrected", "throttle_reasons"), cols):
        getattr(batch, field).extend(col)
    return batch


class Relay(pb_grpc.NodeRelayServicer):
    """Lives on one asyncio loop (`start` on it); `take` is called on that loop."""

    def __init__(self, *, node: str, coordinator: str, address: str = "", token: str = "",
                 tls: TlsFiles | None = None, interval_s: float = 1.0, max_wait_s: float = 0.02) -> None:  # fmt: skip
        self.node, self.coordinator, self.address = node, coordinator, address
        self.token, self.tls = token, tls or TlsFiles()
        self.interval_s, self.max_wait_s = interval_s, max_wait_s
        self._pending: dict[str, tuple[pb.NodeBeat, Ack | None]] = {}  # newest beat of each node this round
        self._recent: dict[str, float] = {}   # node -> when it last beat: how many to wait for in a round
        self._flush_timer: asyncio.TimerHandle | None = None
        self._number = 0
        self._outbox: asyncio.Queue | None = None
        self._inflight: dict[int, list[tuple[Ack, int]]] = {}
        self._upstream: asyncio.Task | None = None
        self.batches_stored = 0
        self._endpoint = 0

    async def start(self) -> None:
        self._outbox = asyncio.Queue(maxsize=16)
        self._upstream = asyncio.create_task(self._forward_forever())

    async def stop(self) -> None:
        if self._upstream is not None:
            self._upstream.cancel()
            self._upstream = None

    @property
    def running(self) -> bool:
        return self._upstream is not None

    # ---- beats in ----------------------------------------------------------------------------

    def take(self, beat: pb.NodeBeat, ack: Ack | None = None) -> None:
        now = time.monotonic()
        self._pending[beat.node] = (beat, ack)
        self._recent[beat.node] = now
        if len(self._pending) >= self._expected(now):
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.max_wait_s, self.flush)

    def _expected(self, now: float) -> int:
        if len(self._recent) > 2 * len(self._pending) + 8:  # prune nodes gone for two intervals, now and then
            self._recent = {n: t for n, t in self._recent.items() if now - t < 2 * self.interval_s}
        return len(self._recent)

    async def Beat(self, request_iterator, context):
        acks: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for beat in request_iterator:
                    self.take(beat, acks.put_nowait)
            finally:
                acks.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (sequence := await acks.get()) is not None:
                yield pb.BeatAck(sequence=sequence)
        finally:
            reader.cancel()

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        beats, self._pending = list(self._pending.values()), {}
        batch = build_batch(self.node, self.address, 0, [b for b, _ in beats])
        self.forward(batch, [(ack, b.heartbeat.sequence) for b, ack in beats if ack is not None])

    def forward(self, batch: pb.RelayBatch, acks: list[tuple[Ack, int]]) -> None:
        """Sends a built batch (numbered here) upstream; `acks` are called once it is stored. (The scale
        benchmark's generator, whose simulated nodes sit beside their relay, builds batches itself.)"""
        self._number += 1
        batch.batch = self._number
        if self._outbox.full():  # the coordinator is slow or gone: the oldest round is stale anyway
            self._inflight.pop(self._outbox.get_nowait().batch, None)
        self._inflight[self._number] = acks
        self._outbox.put_nowait(batch)

    # ---- batches out -------------------------------------------------------------------------

    async def _forward_forever(self) -> None:
        while True:
            try:
                await self._forward_once()
            except grpc.aio.AioRpcError as error:
                log.warning("relay %s: coordinator stream broke (%s); reconnecting", self.node, error.code().name)
                self._endpoint += 1  # several endpoints (a leader and its standbys): the next may lead now
            self._inflight.clear()  # never stored: their nodes see no ack and fall back
            await asyncio.sleep(0.2)

    async def _forward_once(self) -> None:
        endpoints = self.coordinator.split(",")
        async with _aio_channel(endpoints[self._endpoint % len(endpoints)], self.tls) as channel:
            stub = pb_grpc.CoordinatorStub(channel)

            async def batches():
                yield pb.RelayBatch(relay=self.node, relay_address=self.address)  # announces the relay
                while True:
                    try:
                        yield await asyncio.wait_for(self._outbox.get(), self.interval_s)
                    except asyncio.TimeoutError:  # no node beat this interval: say the relay lives
                        yield pb.RelayBatch(relay=self.node, relay_address=self.address)

            async for reply in stub.Relay(batches(), metadata=call_metadata(self.token)):
                self.batches_stored += bool(reply.batch)
                for ack, sequence in self._inflight.pop(reply.batch, ()):
                    ack(sequence)


def _aio_channel(target: str, tls: TlsFiles) -> grpc.aio.Channel:
    if not tls.enabled:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(tls.cert.read_bytes()))


class RelayThread:
    """Runs a Relay and its NodeRelay server on a loop thread of their own (the agent is threaded)."""

    def __init__(self, relay: Relay, listen: str, server_tls: TlsFiles | None = None, advertise_host: str = "") -> None:
        self.relay, self.listen, self.server_tls = relay, listen, server_tls or TlsFiles()
        self.advertise_host = advertise_host  # what other nodes dial ("" : the listen host)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def start(self, token_interceptor=None) -> int:
        """Returns the port, or raises why the relay could not listen (the caller beats on without it)."""
        started, errors = threading.Event(), []

        async def run() -> None:
            try:
                self._server = grpc.aio.server(interceptors=[token_interceptor] if token_interceptor else [])
                pb_grpc.add_NodeRelayServicer_to_server(self.relay, self._server)
                self.port = add_port(self._server, self.listen, self.server_tls)
                await self._server.start()
                host = self.advertise_host or self.listen.rpartition(":")[0]
                self.relay.address = self.relay.address or f"{host}:{self.port}"
                await self.relay.start()
            except Exception as error:  # surfaced to start()'s caller
                errors.append(error)
                return
            finally:
                started.set()
            await self._server.wait_for_termination()

        threading.Thread(target=self.loop.run_until_complete, args=(run(),), daemon=True, name="relay").start()
        started.wait()
        if errors or not self.port:
            raise OSError(f"relay could not listen on {self.listen}: {errors[0] if errors else 'no port'}")
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self.loop).result(5)


class HeartbeatRoute:
    """A node's heartbeats through its relay; thread-safe `send` (the agent's heartbeat thread)."""

    def __init__(self, *, node: str, coordinator: str | Callable[[], str], token: str = "", tls: TlsFiles | None = None,
                 interval_s: float = 1.0, refresh_s: float | None = None) -> None:  # fmt: skip
        self.node, self.coordinator, self.token, self.tls = node, coordinator, token, tls or TlsFiles()
        # Asked again now and then (a relay may have appeared): 30 beats apart, 333 calls/s at 10k nodes.
        self.interval_s, self.refresh_s = interval_s, 30 * interval_s if refresh_s is None else refresh_s
        self.relay = ""
        self._channel = None
        self._beats: queue.SimpleQueue | None = None
        self._broken = threading.Event()
        self._unacked_since: float | None = None   # oldest beat the relay has not acked
        self._route_due_s = 0.0
        self._failed = ""
        self.phase_s = 0.0
        self._asked = 0

    def wait_s(self, now_unix_s: float) -> float:
        """Until this node's next beat: at its relay's phase of the interval (wall clock, so the
        group's beats reach the relay together), or one interval when it has no relay."""
        if not self.relay:
            return self.interval_s
        wait = (self.phase_s - now_unix_s) % self.interval_s
        return wait if wait > self.interval_s / 2 else wait + self.interval_s  # never two beats within half an interval

    def send(self, heartbeat: pb.Heartbeat) -> bool:
        """True: on its way through the relay. Never raises: a False sends the beat directly, and the
        heartbeat thread must outlive any relay trouble."""
        try:
            return self._send(heartbeat)
        except Exception:  # noqa: BLE001 - a bug here must not silence the node
            log.exception("node %s: relay route failed; this beat goes to the coordinator", self.node)
            self._failed, self._route_due_s = self.relay, 0.0
            self._close()
            return False

    def _send(self, heartbeat: pb.Heartbeat) -> bool:
        now = time.monotonic()
        if self.relay and (self._broken.is_set() or self._overdue(now)):
            log.warning("node %s: relay %s failed; falling back to the coordinator", self.node, self.relay)
            self._failed, self._route_due_s = self.relay, 0.0
            self._close()
        if now >= self._route_due_s:
            self._reroute(now)
        if not self.relay:
            return False
        if self._unacked_since is None:
            self._unacked_since = now
        self._beats.put(pb.NodeBeat(node=self.node, sent_unix_s=time.time(), heartbeat=heartbeat))
        return True

    def _overdue(self, now: float) -> bool:
        return self._unacked_since is not None and now - self._unacked_since > 2.5 * self.interval_s

    def _reroute(self, now: float) -> None:
        self._asked += 1
        # Soon again while the first few answers are "no relay" (relays may be starting with the nodes).
        self._route_due_s = now + (self.refresh_s if self.relay or self._asked > 5 else 2 * self.interval_s)
        try:
            target = self.coordinator() if callable(self.coordinator) else self.coordinator
            with open_channel(target, self.tls) as channel:
                reply = pb_grpc.CoordinatorStub(channel).Route(
                    pb.RouteRequest(node=self.node, failed_relay=self._failed), metadata=call_metadata(self.token),
                    timeout=self.interval_s)  # fmt: skip
        except grpc.RpcError as error:
            log.info("node %s: no route (%s); heartbeats go to the coordinator", self.node, error.code().name)
            return
        self._failed = ""
        self.phase_s = reply.phase_s
        if reply.relay != self.relay:
            self._close()
            if reply.relay:
                self._open(reply.relay, reply.relay_address)
            log.info("node %s: heartbeats via %s", self.node, reply.relay or "the coordinator directly")

    def _open(self, relay: str, address: str) -> None:
        self.relay, self._broken = relay, threading.Event()
        self._channel, self._beats = open_channel(address, self.tls), queue.SimpleQueue()
        beats, broken = self._beats, self._broken
        call = pb_grpc.NodeRelayStub(self._channel).Beat(iter(beats.get, None), metadata=call_metadata(self.token))
        threading.Thread(target=self._read_acks, args=(call, broken), daemon=True, name="relay-acks").start()

    def _read_acks(self, call, broken: threading.Event) -> None:
        try:
            for _ack in call:
                self._unacked_since = None
        except grpc.RpcError:
            pass
        broken.set()

    def _close(self) -> None:
        if self._beats is not None:
            self._beats.put(None)
        if self._channel is not None:
            self._channel.close()
        self.relay, self._channel, self._beats, self._unacked_since = "", None, None, None

    def close(self) -> None:
        self._close()


def main(argv: list[str] | None = None) -> int:
    """`python -m hyrun.agent.relay`: a relay on its own (tests, benchmarks); the token comes from
    the environment as for the agent."""
    import argparse

    from hyrun.common.security import TokenInterceptor, token_from_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="the relay's node name")
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT nodes send their beats to (loopback by default)")
    parser.add_argument("--interval", type=float, default=1.0, help="the nodes' heartbeat interval, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s relay[{args.node}] %(levelname)s %(message)s")
    token = token_from_env()
    relay = Relay(node=args.node, coordinator=args.coordinator, token=token, interval_s=args.interval)
    thread = RelayThread(relay, args.listen)
    port = thread.start(TokenInterceptor(token) if token else None)
    print(f"listening {port}", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
