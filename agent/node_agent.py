"""The node agent's main loop: one Connect stream to the coordinator that carries registration,
heartbeats and worker reports up and commands down. Commands are handled on the main thread (the
supervisor must start workers from a thread that lives as long as the agent, see supervisor.py).

If the stream breaks, the agent keeps its workers and reconnects for `reconnect_timeout_s`, trying
each coordinator it was given in turn (a restarted one, or a standby that took over) with jittered
backoff: a coordinator restart must not kill a training job. After that it stops its workers and
exits. Commands carry their coordinator's election epoch; one lower than the highest this agent
was welcomed with comes from a deposed leader and is refused.

Shutdown is bounded: a signal only wakes the shutdown thread (nothing raises into gRPC from a signal
handler: a KeyboardInterrupt once left the agent deadlocked in a channel's finalizer, its workers
running minutes after the job). That thread cancels the stream; the main thread stops the workers
(SIGTERM, then SIGKILL) and frees the RAM snapshots no running job owns. A watchdog kills the
workers and exits the process if that has not happened within SHUTDOWN_BOUND_S.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from hyrun.agent.cards import LocalCard
from hyrun.agent.nic import sample_nic
from hyrun.agent.relay import HeartbeatRoute, Relay, RelayThread
from hyrun.agent.supervisor import KILL_WAIT_S, STOP_GRACE_S, Supervisor
from hyrun.agent.telemetry import CardTelemetrySource, SimulatedCards, sample_host
from hyrun.common.process import reconnect_pause_s
from hyrun.common.security import TlsFiles, TokenInterceptor, call_metadata, open_channel
from hyrun.common.snapshots import free_orphaned_snapshots, shared_memory_dir
from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc

log = logging.getLogger("hyrun.agent")

# From the stop request to the process's exit, whatever the agent was doing: the workers' bounded
# stop (twice: a generation being started may be stopping its predecessor) plus a margin.
SHUTDOWN_BOUND_S = 2 * (STOP_GRACE_S + KILL_WAIT_S) + 2.0


@dataclass(frozen=True)
class AgentSettings:
    coordinator: str                  # HOST:PORT, or several comma-separated (a leader and its standbys)
    node: str
    cards: tuple[LocalCard, ...]
    host: str = ""                    # address other nodes reach this one at; default: hostname
    heartbeat_interval_s: float = 1.0
    reconnect_timeout_s: float = 30.0
    warm_workers: int = -1            # spare worker processes kept ready; -1: one per card
    token: str = ""
    tls: TlsFiles = field(default_factory=TlsFiles)
    shm_dir: Path = field(default_factory=shared_memory_dir)  # where this node's RAM snapshots live
    data_interface: str = ""          # the NIC collectives use: watched and reported; "" = none
    relay_listen: str = ""            # HOST:PORT: also relay other nodes' heartbeats (DESIGN: Scale); "" = not a relay
    relay_tls: TlsFiles = field(default_factory=TlsFiles)  # the relay's own certificate and key (under TLS)
    via_relays: bool = False          # send heartbeats through the relay the coordinator routes this node to


class Outbox:
    """Messages up the stream. The heartbeat goes first and only the latest is kept: a node's
    liveness must not wait behind a burst of step reports, and an old heartbeat says nothing."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._heartbeat: pb.AgentMessage | None = None
        self._messages: collections.deque[pb.AgentMessage] = collections.deque()

    def put(self, message: pb.AgentMessage) -> None:
        with self._ready:
            self._messages.append(message)
            self._ready.notify()

    def put_heartbeat(self, message: pb.AgentMessage) -> None:
        with self._ready:
            self._heartbeat = message
            self._ready.notify()

    def get(self, timeout_s: float) -> pb.AgentMessage | None:
        with self._ready:
            if self._heartbeat is None and not self._messages:
                self._ready.wait(timeout_s)
            if self._heartbeat is not None:
                message, self._heartbeat = self._heartbeat, None
                return message
            return self._messages.popleft() if self._messages else None


class NodeAgent:
    def __init__(self, settings: AgentSettings, telemetry: CardTelemetrySource) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.outbox = Outbox()
        # What a dead agent, launcher or job left in RAM on this host goes before new workers start.
        free_orphaned_snapshots(settings.shm_dir)
        warm = len(settings.cards) if settings.warm_workers < 0 else settings.warm_workers
        self.supervisor = Supervisor(
            settings.node, self.outbox.put, self._observe_step, warm_workers=warm, shm_dir=settings.shm_dir
        )
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        self._stop = threading.Event()      # set once: the agent is shutting down
        self._exited = threading.Event()    # set once run() has stopped the workers and cleaned up
        self._stop_reason = ""
        self._call: grpc.Future | None = None  # the live Connect stream, cancelled on stop
        self._sequence = 0
        self._lost_since: float | None = None  # when the stream to the coordinator last broke
        self.endpoints = [e.strip() for e in settings.coordinator.split(",") if e.strip()]
        self._endpoint = 0  # which of `endpoints` to try next
        self.epoch = 0  # the highest leader epoch this agent has been welcomed with

    def request_stop(self, reason: str) -> None:
        """From any thread (never from a signal handler: see install_signal_handlers)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            log.info("stopping: %s", reason)
        self._stop.set()

    # ------------------------------------------------------------------ messages up

    def _register(self) -> pb.AgentMessage:
        cards = [
            pb.CardInfo(index=c.index, type=c.type, memory_bytes=c.memory_bytes, speed=c.speed, simulated=c.simulated, uuid=c.uuid)
            for c in self.settings.cards
        ]
        host = self.settings.host or socket.gethostname()
        return pb.AgentMessage(register=pb.Register(node=self.settings.node, cards=cards, host=host, agent_pid=os.getpid(),
                                                    running_generation=self.supervisor.running_generation))

    def _heartbeat(self) -> pb.AgentMessage:
        self._sequence += 1
        host = sample_host()
        cards = [
            pb.CardTelemetry(
                index=s.index,
                temperature_c=s.temperature_c,
                slowdown_temperature_c=s.slowdown_temperature_c,
                power_w=s.power_w,
                utilization=s.utilization,
                memory_used_bytes=s.memory_used_bytes,
                ecc_uncorrected=s.ecc_uncorrected,
                xid_events=list(s.xid_events),
                throttle_reasons=s.throttle_reasons,
            )
            for s in self.telemetry.sample()
        ]
        return pb.AgentMessage(
            heartbeat=pb.Heartbeat(
                sequence=self._sequence,
                cards=cards,
                host=pb.HostTelemetry(
                    cpu_percent=host.cpu_percent,
                    memory_percent=host.memory_percent,
                    net_errors=host.net_errors,
                    net_drops=host.net_drops,
                    data_nic=(pb.NicTelemetry(**asdict(sample_nic(self.settings.data_interface)))
                              if self.settings.data_interface else None),
                ),
            )
        )

    def _observe_step(self, card: int, step: int) -> None:
        if isinstance(self.telemetry, SimulatedCards):
            self.telemetry.observe_step(card, step, time.monotonic())

    def _script_simulated_faults(self, start: pb.StartGeneration) -> None:
        """Simulated cards play the job's scripted hardware faults for this node and generation."""
        if isinstance(self.telemetry, SimulatedCards):
            faults = json.loads(start.job_json).get("faults", [])
            self.telemetry.script(
                [f for f in faults if f["node"] == self.settings.node and f.get("generation", 1) == start.generation]
            )

    def _heartbeat_loop(self) -> None:
        """Its own thread, doing nothing else: command handling (starting workers) and report
        forwarding (reading pipes and logs) happen elsewhere and cannot delay a beat. Through a relay
        when routed to one (agent/relay.py); on the Connect stream otherwise or when the relay fails."""
        route = self._heartbeat_route()
        while not self._stop.wait(route.wait_s(time.time()) if route else self.heartbeat_interval_s):
            beat = self._heartbeat()
            if route is None or not route.send(beat.heartbeat):
                self.outbox.put_heartbeat(beat)

    def _heartbeat_route(self) -> HeartbeatRoute | None:
        s = self.settings
        if s.relay_listen and s.tls.enabled and not s.relay_tls.enabled:
            # Nodes reach a relay with the cluster's CA and token, as they reach the coordinator: never in clear text.
            log.error("under TLS a relay needs a certificate of its own (--relay-tls-cert/--relay-tls-key); this agent does not relay")
        elif s.relay_listen:
            relay = Relay(node=s.node, coordinator=",".join(self.endpoints), token=s.token, tls=s.tls,
                          interval_s=self.heartbeat_interval_s)  # fmt: skip
            thread = RelayThread(relay, s.relay_listen, server_tls=s.relay_tls, advertise_host=s.host or socket.gethostname())
            try:
                log.info("relaying heartbeats on port %d", thread.start(TokenInterceptor(s.token) if s.token else None))
            except OSError as error:
                log.error("%s; this agent does not relay", error)
        if not s.via_relays:
            return None
        return HeartbeatRoute(node=s.node, coordinator=lambda: self.endpoints[self._endpoint % len(self.endpoints)],
                              token=s.token, tls=s.tls, interval_s=self.heartbeat_interval_s)  # fmt: skip

    def _requests(self, connection_closed: threading.Event):
        yield self._register()
        while not connection_closed.is_set() and not self._stop.is_set():
            message = self.outbox.get(timeout_s=0.1)
            if message is not None:
                yield message

    # ------------------------------------------------------------------ commands down

    def _handle(self, command: pb.CoordinatorCommand) -> None:
        kind = command.WhichOneof("body")
        if not from_leader(command, self.epoch):
            log.warning("refused %s from a deposed coordinator (epoch %d; the leader's is %d)", kind, command.epoch, self.epoch)
            if kind == "welcome":
                raise _Deposed()
            return
        if kind == "welcome":
            self.epoch = command.welcome.epoch
            self._lost_since = None
            self.heartbeat_interval_s = command.welcome.heartbeat_interval_s or self.heartbeat_interval_s
            log.info("connected to coordinator %s (version %s, epoch %d)", self.endpoints[self._endpoint % len(self.endpoints)],
                     command.welcome.coordinator_version, self.epoch)
        elif kind == "start":
            log.info("starting generation %d: ranks %s", command.start.generation, [r.rank for r in command.start.ranks])
            self._script_simulated_faults(command.start)
            self.supervisor.start_generation(command.start)
        elif kind == "checkpoint_now":
            log.info("checkpoint now (generation %d): %s", command.checkpoint_now.generation, command.checkpoint_now.reason)
            self.supervisor.send_control(command.checkpoint_now.generation, {"kind": "checkpoint_now"})
        elif kind == "stop":
            self.supervisor.stop_generation(command.stop.generation, command.stop.reason)
        elif kind == "shutdown":
            self.request_stop(f"the coordinator asked: {command.shutdown.reason}")

    def _serve_one_connection(self, address: str) -> None:
        channel = open_channel(address, self.settings.tls)
        closed = threading.Event()
        try:
            stub = pb_grpc.CoordinatorStub(channel)
            self._call = stub.Connect(self._requests(closed), metadata=call_metadata(self.settings.token))
            if self._stop.is_set():  # a stop that came before the call existed
                self._call.cancel()
            for command in self._call:
                self._handle(command)
                if self._stop.is_set():
                    return
        finally:
            closed.set()
            self._call = None
            channel.close()

    def _serve(self) -> int:
        failures = 0  # connection attempts in a row that reached no leader
        while not self._stop.is_set():
            address = self.endpoints[self._endpoint % len(self.endpoints)]
            try:
                self._serve_one_connection(address)
            except grpc.RpcError as error:
                if self._stop.is_set():
                    break
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("coordinator %s refused this agent: %s", address, error.details())
                    return 2
                log.warning("coordinator %s unreachable (%s)", address, error.code().name)
            except _Deposed:
                log.warning("coordinator %s was deposed", address)
            if self._lost_since is None:  # it had welcomed us: the stream just broke
                failures = 0
            else:
                failures += 1
                self._endpoint += 1  # the next one may lead now
            lost_since = self._lost_since = self._lost_since or time.monotonic()
            if time.monotonic() - lost_since > self.settings.reconnect_timeout_s:
                log.error("no coordinator for %.0f s; stopping this node's workers", self.settings.reconnect_timeout_s)
                return 1
            rounds = failures // len(self.endpoints)  # back off once every endpoint was tried
            self._stop.wait(reconnect_pause_s(rounds))
        return 0

    def run(self) -> int:
        """Serves until shut down, signalled, or the coordinator stays unreachable; returns an exit code.
        Once a stop is requested it returns within SHUTDOWN_BOUND_S, or the watchdog ends the process."""
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        threading.Thread(target=self._shutdown_when_stopped, daemon=True, name="shutdown").start()
        try:
            return self._serve()
        finally:
            self.request_stop(self._stop_reason or "the agent's loop ended")
            self.supervisor.close()
            # RAM snapshots outlive workers on purpose (a restart reads them), not their owner.
            free_orphaned_snapshots(self.settings.shm_dir, leaving=True)
            self._exited.set()

    def _shutdown_when_stopped(self) -> None:
        """Wakes the main thread out of the stream on a stop; kills everything if it is not out in time."""
        self._stop.wait()
        call = self._call
        if call is not None:
            call.cancel()
        if self._exited.wait(SHUTDOWN_BOUND_S):
            return
        log.error("shutdown took over %.0f s (%s): killing the workers and exiting", SHUTDOWN_BOUND_S, self._stop_reason)
        self.supervisor.kill_all_now()
        try:
            free_orphaned_snapshots(self.settings.shm_dir, leaving=True)
        finally:
            os._exit(1)


def from_leader(command: pb.CoordinatorCommand, highest_epoch: int) -> bool:
    """Whether to obey a command, given the highest leader epoch this agent has been welcomed with.
    Epochs only grow (etcd revisions), so a lower one comes from a coordinator since deposed; 0 is
    a coordinator without an election (in-memory store), which never shares agents with one."""
    return command.epoch >= highest_epoch


class _Deposed(Exception):
    """A coordinator welcomed this agent with an older epoch than one it has already seen."""


def install_signal_handlers(agent: NodeAgent) -> None:
    """SIGTERM and SIGINT ask the agent to stop. The handler only writes the signal's number to a
    pipe; a thread reads it and calls request_stop(). Nothing is raised or locked in the handler,
    which may run in the middle of gRPC's code. SIGINT is set too: a process started in the
    background inherits it ignored."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def on_signal(signum, _frame) -> None:
        try:
            os.write(wake_write, bytes([signum]))
        except BlockingIOError:  # the pipe is full of earlier signals: one is enough
            pass

    def forward() -> None:
        while True:
            for signum in os.read(wake_read, 64):
                agent.request_stop(f"{signal.Signals(signum).name} received")

    threading.Thread(target=forward, daemon=True, name="signals").start()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
