"""The coordinator's network edge: a grpc.aio server whose handlers turn messages into calls on the
Orchestrator, one event loop, no locks. `CoordinatorService` runs it on a background thread (the
embedded cluster of `hyrun launch`) or in the foreground (`hyrun coordinator`).

Each agent holds one bidirectional Connect stream: it registers first, then sends heartbeats and
worker reports; commands for it are queued on its outbox and written back down the same stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import grpc

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.runtime import __version__
from hyrun.runtime.coordinator.evaluations import EvalForOtherJob, EvalRejected
from hyrun.runtime.coordinator.membership import CardRecord, Membership, NodeRecord
from hyrun.runtime.coordinator.ingest import JobRejected
from hyrun.runtime.coordinator.orchestrator import Orchestrator, OrchestratorSettings, RendezvousFactory
from hyrun.runtime.coordinator.relay_handlers import RelayHandlers
from hyrun.runtime.coordinator.relay_ingest import RelayIngest
from hyrun.runtime.coordinator.relays import DEFAULT_FAN_IN
from hyrun.runtime.coordinator.persist import JOBS_PREFIX
from hyrun.runtime.coordinator.store import Deposed, MemoryStore, Store
from hyrun.runtime.coordinator.store_writer import StoreWriter
from hyrun.runtime.jobfile import JobFileError, load_job_text
from hyrun.runtime.metrics import CoordinatorMetrics
from hyrun.common.security import TlsFiles, TokenInterceptor, add_port

log = logging.getLogger("hyrun.coordinator")


@dataclass(frozen=True)
class CoordinatorSettings:
    host: str = "127.0.0.1"          # loopback unless told otherwise
    port: int = 0
    advertise_host: str = "127.0.0.1"  # what workers on other nodes dial for the rendezvous store
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    token: str = ""
    tls: TlsFiles = field(default_factory=TlsFiles)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 0     # None: no /metrics server
    store_url: str = "memory"
    run_root: str = "runs"
    relay_fan_in: int = DEFAULT_FAN_IN  # nodes per relay (DESIGN: Scale)
    standby: bool = False            # etcd store: wait for the current leader to go, then take over
    lease_ttl_s: int = 5             # etcd store: a dead leader's successor takes over this long after

    def __post_init__(self) -> None:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat timeout ({self.heartbeat_timeout_s} s) must exceed twice the interval "
                f"({self.heartbeat_interval_s} s), or live nodes are declared dead between two beats"
            )


def open_store(url: str) -> Store:
    """`memory` or `etcd://HOST:PORT` (the job file's `store`)."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("etcd://"):
        # Imported here: only a coordinator configured for etcd needs the etcd client installed.
        from hyrun.runtime.coordinator.etcd_store import EtcdStore

        return EtcdStore.from_url(url)
    raise ValueError(f"store {url!r}: must be 'memory' or 'etcd://HOST:PORT'")


class CoordinatorServicer(RelayHandlers, pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        settings: CoordinatorSettings,
        metrics: CoordinatorMetrics,
        open_rendezvous: RendezvousFactory,
        writer: StoreWriter,
        epoch: int = 0,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.epoch = epoch  # stamped on every command: agents refuse a deposed leader's
        self.membership = Membership()
        self.outboxes: dict[str, asyncio.Queue] = {}
        self.watchers: set[asyncio.Queue] = set()
        self.orchestrator = Orchestrator(
            membership=self.membership,
            writer=writer,
            metrics=metrics,
            send=self._send,
            publish=self._publish,
            settings=OrchestratorSettings(
                run_root=settings.run_root, bind_host=settings.host, advertise_host=settings.advertise_host,
                heartbeat_timeout_s=settings.heartbeat_timeout_s,
            ),
            open_rendezvous=open_rendezvous,
            close_stream=self._close_stream,
        )
        self.relays = RelayIngest(cards=metrics.cards_health, membership=self.membership, orchestrator=self.orchestrator,
                                  heartbeat_timeout_s=settings.heartbeat_timeout_s, fan_in=settings.relay_fan_in)

    # ------------------------------------------------------------------ plumbing

    def _send(self, node: str, command: pb.CoordinatorCommand) -> None:
        outbox = self.outboxes.get(node)
        if outbox is None:
            log.warning("no stream to node %s; dropped %s", node, command.WhichOneof("body"))
            return
        command.epoch = self.epoch
        outbox.put_nowait(command)

    def _publish(self, event: pb.JobEvent) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)

    def _close_stream(self, node: str) -> None:
        outbox = self.outboxes.get(node)
        if outbox is not None:
            outbox.put_nowait(None)  # close the stream of a node we declared dead

    async def tick_forever(self) -> None:
        # Policy runs on this timer over the state, never per message (DESIGN: Scale). The timer
        # also measures its own lateness: a stalled loop is the coordinator's problem, not the agents'.
        period_s = min(0.1, self.settings.heartbeat_interval_s / 4)
        due = time.monotonic()
        while True:
            now = time.monotonic()
            self.orchestrator.note_loop_lag(max(0.0, now - due), now)
            self.orchestrator.tick(now)
            self.relays.tick(now)
            due = time.monotonic() + period_s
            await asyncio.sleep(period_s)

    # ------------------------------------------------------------------ agents

    async def Connect(self, request_iterator, context):
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "register":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the first message must be Register")
        reg = first.register
        cards = tuple(CardRecord(c.index, c.type, c.memory_bytes, c.speed, c.simulated) for c in reg.cards)
        now = time.monotonic()
        node = NodeRecord(reg.node, reg.host, cards, reg.agent_pid, last_heartbeat_s=now, registered_s=now)
        outbox: asyncio.Queue = asyncio.Queue()
        old = self.outboxes.get(node.name)
        if old is not None:
            old.put_nowait(None)  # a re-registering agent replaces its broken stream
        self.outboxes[node.name] = outbox
        self.membership.register(node)
        log.info("node %s registered: %d cards, agent pid %d%s", node.name, len(cards), reg.agent_pid,
                 f", running generation {reg.running_generation}" if reg.running_generation else "")
        welcome = pb.Welcome(coordinator_version=__version__, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                             epoch=self.epoch)
        outbox.put_nowait(pb.CoordinatorCommand(welcome=welcome, epoch=self.epoch))
        self.orchestrator.on_register(node, time.monotonic())
        reader = asyncio.create_task(self._read_agent(node.name, request_iterator, outbox))
        try:
            while (command := await outbox.get()) is not None:
                yield command
        finally:
            reader.cancel()
            if self.outboxes.get(node.name) is outbox:
                del self.outboxes[node.name]
                self.membership.disconnect(node.name)

    async def _read_agent(self, name: str, request_iterator, outbox: asyncio.Queue) -> None:
        try:
            async for message in request_iterator:
                self._dispatch(name, message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            log.info("stream from node %s closed", name)
            outbox.put_nowait(None)

    def _dispatch(self, name: str, message: pb.AgentMessage) -> None:
        now = time.monotonic()
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            self.metrics.heartbeats_total.inc()
            self.membership.heartbeat(name, now)
            self.orchestrator.on_heartbeat(name, message.heartbeat, now)
        elif kind == "step":
            self.membership.heartbeat(name, now)
            self.orchestrator.on_step(name, message.step, now)
        elif kind == "progress":
            self.orchestrator.on_progress(name, message.progress, now)
        elif kind == "worker_exit":
            self.orchestrator.on_worker_exit(name, message.worker_exit, now)
        elif kind == "worker_started":
            log.info("node %s: rank %d started (pid %d)", name, message.worker_started.rank, message.worker_started.pid)
            self.orchestrator.on_worker_started(name, message.worker_started)

    # ------------------------------------------------------------------ CLI

    async def SubmitJob(self, request, context):
        try:
            spec = load_job_text(request.job_yaml, source="submitted job")
            job_id = self.orchestrator.submit(spec, time.monotonic(), job_id=request.job_id or None)
        except (JobFileError, JobRejected) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.SubmitJobReply(job_id=job_id)

    async def WatchJob(self, request, context):
        job = self.orchestrator.job
        if job is None or job.job_id != request.job_id:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}")
        queue: asyncio.Queue = asyncio.Queue()
        self.watchers.add(queue)
        try:
            event = self.orchestrator.event()
            while True:
                yield event
                if event.state in ("COMPLETED", "FAILED"):
                    return
                event = await queue.get()
        finally:
            self.watchers.discard(queue)

    async def Drain(self, request, context):
        try:
            message = self.orchestrator.drain_node(request.node, request.reason, time.monotonic())
        except JobRejected as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return pb.DrainReply(message=message)

    async def Readmit(self, request, context):
        try:
            message = self.orchestrator.readmit_cards(request.node, list(request.cards), request.reason)
        except JobRejected as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return pb.ReadmitReply(message=message)

    async def ReportEval(self, request, context):
        try:
            self.orchestrator.on_eval(request)
        except EvalForOtherJob as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except EvalRejected as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return pb.EvalReply()

    async def Status(self, request, context):
        jobs = [self.orchestrator.event()] if self.orchestrator.job else []
        return pb.StatusReply(jobs=jobs, nodes=self.orchestrator.node_states())


class CoordinatorService:
    """Owns the event loop, the gRPC server and the /metrics server."""

    def __init__(self, settings: CoordinatorSettings, open_rendezvous: RendezvousFactory) -> None:
        self.settings = settings
        self.open_rendezvous = open_rendezvous
        self.metrics = CoordinatorMetrics()
        self.port = 0
        self.metrics_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self.servicer: CoordinatorServicer | None = None
        self.store: Store | None = None
        self.writer: StoreWriter | None = None
        self.leadership = None  # EtcdLeadership with an etcd store
        self.deposed: str = ""  # why this coordinator stopped leading, if it did
        self.ended = threading.Event()  # set once the service has stopped, whoever stopped it
        self._campaign_stop = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def _start(self) -> None:
        self.store = open_store(self.settings.store_url)
        epoch = await asyncio.get_running_loop().run_in_executor(None, self._lead)
        if epoch is None:
            raise InterruptedError("stopped while standing by")
        self.writer = StoreWriter(self.store, on_deposed=self._on_deposed)
        interceptors = [TokenInterceptor(self.settings.token)] if self.settings.token else []
        self._server = grpc.aio.server(interceptors=interceptors)
        self.servicer = CoordinatorServicer(self.settings, self.metrics, self.open_rendezvous, self.writer, epoch)
        documents = await asyncio.get_running_loop().run_in_executor(None, self.store.list, JOBS_PREFIX)
        self.servicer.orchestrator.restore(documents, time.monotonic())
        pb_grpc.add_CoordinatorServicer_to_server(self.servicer, self._server)
        self.port = add_port(self._server, f"{self.settings.host}:{self.settings.port}", self.settings.tls)
        if self.port == 0:
            raise OSError(f"could not listen on {self.settings.host}:{self.settings.port}")
        await self._server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        self._stopped = asyncio.Event()
        self._ticker = asyncio.create_task(self.servicer.tick_forever())
        log.info("coordinator listening on %s (metrics on %d)", self.address, self.metrics_port)

    def _lead(self) -> int | None:
        """Becomes the leader (etcd: waits for the election; memory: at once); returns the epoch."""
        if not getattr(self.store, "durable", False):
            log.warning("job state is in memory: if this coordinator restarts, running jobs are lost "
                        "(use --store etcd://HOST:PORT to carry them on)")
            return 0
        from hyrun.runtime.coordinator.etcd_election import EtcdLeadership

        identity = {"address": f"{self.settings.host}:{self.settings.port}", "host": socket.gethostname(), "pid": os.getpid()}
        self.leadership = EtcdLeadership(self.store, identity, ttl_s=self.settings.lease_ttl_s)
        wait_s = None if self.settings.standby else self.settings.lease_ttl_s + 2.0

        def waiting(holder: dict) -> None:
            log.warning("coordinator %s (pid %s on %s) leads; %s", holder.get("address"), holder.get("pid"),
                        holder.get("host"), "standing by" if self.settings.standby else
                        f"waiting up to {wait_s:.0f} s for its lease to run out (--standby waits for good)")

        if not self.leadership.campaign(self._campaign_stop, wait_s, on_wait=waiting):
            if self._campaign_stop.is_set():
                return None
            raise OSError(f"another coordinator ({self.leadership.holder()}) leads this etcd; start this one with --standby to take over when it goes")
        self.store.fence(self.leadership.key, self.leadership.epoch)
        log.info("leading with epoch %d", self.leadership.epoch)
        return self.leadership.epoch

    def _on_deposed(self, error: Deposed) -> None:
        """From the store writer's thread: another coordinator leads; stop acting at once."""
        self.deposed = str(error)
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    async def _run(self, started: threading.Event, errors: list) -> None:
        try:
            await self._start()
        except Exception as error:  # surfaced to start()'s caller
            errors.append(error)
            started.set()
            self.ended.set()
            return
        started.set()
        watch = asyncio.create_task(self._watch_lease())
        await self._stopped.wait()
        watch.cancel()
        self._ticker.cancel()
        await self._server.stop(grace=0.5)
        self.metrics.close()
        if not self.deposed:
            self.writer.close()
            if self.leadership is not None:
                self.leadership.resign()  # a standby takes over now, not a lease later
        self.store.close()

    async def _watch_lease(self) -> None:
        while self.leadership is not None and not self.leadership.lost.is_set():
            await asyncio.sleep(0.2)
        if self.leadership is not None:
            self.deposed = f"the leader lease (epoch {self.leadership.epoch}) ran out"
            log.error("%s: stopping", self.deposed)
            self._stopped.set()

    def start(self) -> None:
        """Starts on a background thread; returns once listening (or raises why it could not)."""
        started, errors = threading.Event(), []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(started, errors), name="coordinator", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]

    def _serve(self, started: threading.Event, errors: list) -> None:
        try:
            self._loop.run_until_complete(self._run(started, errors))
        finally:
            self.ended.set()

    def stop(self) -> None:
        self._campaign_stop.set()
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def call(self, fn, *args):
        """Runs fn(*args) on the coordinator's loop and returns its result (for tests and the CLI)."""
        future = asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop)
        return future.result(timeout=10)


async def _call(fn, *args):
    return fn(*args)

