"""The node agent's main loop: one Connect stream to the coordinator that carries registration,
heartbeats and worker reports up and commands down. Commands are handled on the main thread (the
supervisor must start workers from a thread that lives as long as the agent, see supervisor.py).

If the stream breaks, the agent keeps its workers and reconnects for `reconnect_timeout_s`: a
coordinator restart must not kill a training job. After that it stops its workers and exits.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hyrun.agent.cards import LocalCard
from hyrun.agent.supervisor import Supervisor
from hyrun.agent.telemetry import CardTelemetrySource, SimulatedCards, sample_host
from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.common.security import TlsFiles, call_metadata, open_channel

log = logging.getLogger("hyrun.agent")


@dataclass(frozen=True)
class AgentSettings:
    coordinator: str                  # HOST:PORT
    node: str
    cards: tuple[LocalCard, ...]
    host: str = ""                    # address other nodes reach this one at; default: hostname
    heartbeat_interval_s: float = 1.0
    reconnect_timeout_s: float = 30.0
    warm_workers: int = -1            # spare worker processes kept ready; -1: one per card
    token: str = ""
    tls: TlsFiles = field(default_factory=TlsFiles)


class ShutdownRequested(Exception):
    pass


class NodeAgent:
    def __init__(self, settings: AgentSettings, telemetry: CardTelemetrySource) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.outbox: queue.Queue[pb.AgentMessage] = queue.Queue()
        warm = len(settings.cards) if settings.warm_workers < 0 else settings.warm_workers
        self.supervisor = Supervisor(settings.node, self.outbox.put, self._observe_step, warm_workers=warm)
        self._job_ids: set[str] = set()  # jobs whose RAM checkpoint snapshots this node may hold
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        self._stop = threading.Event()
        self._sequence = 0
        self._lost_since: float | None = None  # when the stream to the coordinator last broke

    # ------------------------------------------------------------------ messages up

    def _register(self) -> pb.AgentMessage:
        cards = [
            pb.CardInfo(index=c.index, type=c.type, memory_bytes=c.memory_bytes, speed=c.speed, simulated=c.simulated, uuid=c.uuid)
            for c in self.settings.cards
        ]
        host = self.settings.host or socket.gethostname()
        return pb.AgentMessage(register=pb.Register(node=self.settings.node, cards=cards, host=host, agent_pid=os.getpid()))

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
        while not self._stop.wait(self.heartbeat_interval_s):
            self.outbox.put(self._heartbeat())

    def _requests(self, connection_closed: threading.Event):
        yield self._register()
        while not connection_closed.is_set() and not self._stop.is_set():
            try:
                message = self.outbox.get(timeout=0.1)
            except queue.Empty:
                continue
            yield message

    # ------------------------------------------------------------------ commands down

    def _handle(self, command: pb.CoordinatorCommand) -> None:
        kind = command.WhichOneof("body")
        if kind == "welcome":
            self._lost_since = None
            self.heartbeat_interval_s = command.welcome.heartbeat_interval_s or self.heartbeat_interval_s
            log.info("connected to coordinator %s (version %s)", self.settings.coordinator, command.welcome.coordinator_version)
        elif kind == "start":
            log.info("starting generation %d: ranks %s", command.start.generation, [r.rank for r in command.start.ranks])
            self._script_simulated_faults(command.start)
            self._job_ids.add(os.path.basename(command.start.run_dir))
            self.supervisor.start_generation(command.start)
        elif kind == "checkpoint_now":
            log.info("checkpoint now (generation %d): %s", command.checkpoint_now.generation, command.checkpoint_now.reason)
            self.supervisor.send_control(command.checkpoint_now.generation, {"kind": "checkpoint_now"})
        elif kind == "stop":
            self.supervisor.stop_generation(command.stop.generation, command.stop.reason)
        elif kind == "shutdown":
            raise ShutdownRequested(command.shutdown.reason)

    def _serve_one_connection(self) -> None:
        channel = open_channel(self.settings.coordinator, self.settings.tls)
        closed = threading.Event()
        try:
            stub = pb_grpc.CoordinatorStub(channel)
            for command in stub.Connect(self._requests(closed), metadata=call_metadata(self.settings.token)):
                self._handle(command)
        finally:
            closed.set()
            channel.close()

    def run(self) -> int:
        """Serves until shut down, signalled, or the coordinator stays unreachable; returns an exit code."""
        threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat").start()
        try:
            while not self._stop.is_set():
                try:
                    self._serve_one_connection()
                except grpc.RpcError as error:
                    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                        log.error("coordinator refused this agent: %s", error.details())
                        return 2
                    log.warning("coordinator unreachable (%s); retrying", error.code().name)
                lost_since = self._lost_since = self._lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.settings.reconnect_timeout_s:
                    log.error("no coordinator for %.0f s; stopping this node's workers", self.settings.reconnect_timeout_s)
                    return 1
                self._stop.wait(0.5)
            return 0
        except ShutdownRequested as request:
            log.info("shutdown requested: %s", request)
            return 0
        except KeyboardInterrupt as interrupt:
            log.info("interrupted (%s)", interrupt or "SIGINT")
            return 0
        finally:
            self._stop.set()
            self.supervisor.close()
            self._free_snapshots()

    def _free_snapshots(self) -> None:
        """RAM snapshots outlive workers on purpose (a restart reads them); not the agent."""
        if not self._job_ids:
            return
        from hyrun.runtime.checkpoint import remove_snapshots

        for job_id in self._job_ids:
            remove_snapshots(Path("/dev/shm"), job_id)



def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install_signal_handlers() -> None:
    """SIGTERM behaves like Ctrl-C: `run()` unwinds and stops the node's workers on the way out.
    SIGINT is set too: a process started in the background inherits it ignored."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
