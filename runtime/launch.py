"""`hyrun launch`: submit a job to a coordinator and follow it to the end.

Embedded mode (the default) first brings up a whole cluster on this machine: the coordinator on a
background thread of this process and one agent process per node of the job file, each agent in
its own process group with its workers. Whatever way this process ends — success, failure, Ctrl-C,
SIGTERM, even SIGKILL (agents die with their parent) — no process it started is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf import json_format

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings
from hyrun.runtime.jobfile import FaultSpec, JobSpec, new_job_id
from hyrun.runtime.launch_faults import LauncherFaults
from hyrun.runtime.storage_faults import StorageFaults
from hyrun.runtime.network.faults import network_fault
from hyrun.runtime.network.hosts import DATA_IF, NetnsHosts
from hyrun.runtime.rendezvous import GenerationStore
from hyrun.common.process import kill_group, reconnect_pause_s
from hyrun.common.security import TOKEN_ENV, TlsFiles, call_metadata, open_channel

log = logging.getLogger("hyrun.launch")

AGENT_STOP_GRACE_S = 5.0


@dataclass
class JobOutcome:
    job_id: str
    state: str
    message: str
    run_dir: Path
    wall_time_s: float
    losses: dict[int, float] = field(default_factory=dict)
    step_done_s: dict[int, float] = field(default_factory=dict)  # when the launcher heard of it, since submission
    tokens_per_s: list[float] = field(default_factory=list)
    generations: int = 0
    evictions: list[str] = field(default_factory=list)
    steps_lost: int = 0
    incidents: list[dict] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.state == "COMPLETED"


class EmbeddedCluster:
    """The coordinator plus one agent process per node, all on this machine."""

    def __init__(self, job: JobSpec, run_dir: Path, token: str, hosts: NetnsHosts | None = None) -> None:
        self.job = job
        self.run_dir = run_dir
        self.token = token
        self.hosts = hosts  # each node in its own network namespace, or all on loopback
        runtime = job.runtime
        listen, self.tls = "127.0.0.1", TlsFiles()
        if hosts is not None:
            # As on a real cluster: the coordinator on the control network, with TLS and the token.
            from hyrun.runtime.network.tls import write_self_signed  # cryptography: only for --netns

            listen = hosts.bridge_ip["control"]
            cert, key = write_self_signed(run_dir / "tls", listen)
            self.tls = TlsFiles(cert=cert, key=key)
        self.coordinator = CoordinatorService(
            CoordinatorSettings(
                host=listen,
                advertise_host=listen,
                tls=self.tls,
                heartbeat_interval_s=runtime.heartbeat_interval_s,
                heartbeat_timeout_s=runtime.heartbeat_timeout_s,
                token=token,
                metrics_host=job.metrics.host,
                metrics_port=job.metrics.port,
                store_url=job.store,
                run_root=str(run_dir.parent),
            ),
            open_rendezvous=GenerationStore,
        )
        self.agents: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.coordinator.start()
        (self.run_dir / "coordinator.json").write_text(
            json.dumps({"address": self.coordinator.address, "metrics_port": self.coordinator.metrics_port})
        )
        token_file = self.run_dir / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.token)
        for node in self.job.cluster.nodes:
            self._start_agent(node.name, [group.model_dump() for group in node.cards])

    def send_signal(self, fault: FaultSpec) -> None:
        """A `signal` fault: sent from outside to the card's worker or the node's agent, now."""
        if fault.target == "agent":
            pid = self.agents[fault.node].pid
        else:
            orchestrator = self.coordinator.servicer.orchestrator
            pid = self.coordinator.call(orchestrator.worker_pid, fault.node, fault.card)
            if pid is None:
                raise RuntimeError(f"no worker runs on {fault.node}/card{fault.card}")
        os.kill(pid, getattr(signal, fault.signal))

    def _start_agent(self, node: str, card_groups: list[dict]) -> None:
        command = [
            sys.executable, "-m", "hyrun.runtime.cli", "agent",
            "--coordinator", self.coordinator.address,
            "--node", node,
            "--cards-json", json.dumps(card_groups),
            "--host", "127.0.0.1",
            "--heartbeat-interval", str(self.job.runtime.heartbeat_interval_s),
            "--parent-pid", str(os.getpid()),
            "--warm-workers", str(self.job.runtime.warm_workers),
        ]  # fmt: skip
        if self.job.runtime.relays:  # the first node relays for all (under TLS, agents send directly)
            command += ["--via-relays"] + (["--relay-listen", "127.0.0.1:0"] if node == self.job.cluster.nodes[0].name else [])
        if self.hosts is not None:
            host = self.hosts.hosts[node]
            command[command.index("--host") + 1] = host.data_ip
            command += ["--data-interface", DATA_IF, "--tls-ca", str(self.tls.cert)]
            command = self.hosts.command(node, command)
        log_path = self.run_dir / f"agent-{node}.log"
        with open(log_path, "ab") as log_file:
            # Its own session: Ctrl-C reaches only us, and we can signal the agent and its
            # workers together through the process group.
            self.agents[node] = subprocess.Popen(
                command,
                env=dict(os.environ, **{TOKEN_ENV: self.token}),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def agent_failures(self) -> list[str]:
        return [
            f"agent for node {node} exited with code {proc.returncode} (log: {self.run_dir / f'agent-{node}.log'})"
            for node, proc in self.agents.items()
            if proc.poll() is not None and proc.returncode != 0
        ]

    def stop(self) -> None:
        """SIGTERM every agent's process group, then SIGKILL what is left after the grace period."""
        for proc in self.agents.values():
            kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + AGENT_STOP_GRACE_S
        for proc in self.agents.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_group(proc.pid, signal.SIGKILL)  # workers left in the group, if any
            proc.wait()
        self.coordinator.stop()


# A coordinator that went away (killed, restarting, a standby taking over): try again.
_LOST = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def follow_job(
    coordinator: str,
    job_text: str,
    *,
    job_id: str,
    token: str,
    tls: TlsFiles,
    on_event: Callable[[pb.JobEvent], None],
    reconnect_timeout_s: float = 60.0,
) -> pb.JobEvent:
    """Submits the job and streams its events until it ends; returns the last event. `coordinator`
    may name several (a leader and its standbys, comma-separated): when the one followed goes away,
    the others are tried, with backoff, for up to `reconnect_timeout_s`. A coordinator that comes
    back without the job (an in-memory store) is given it again under the same id: it resumes
    from the job's newest checkpoint."""
    endpoints = [e.strip() for e in coordinator.split(",") if e.strip()]
    submitted, attempt, lost_since = False, 0, None
    metadata = call_metadata(token)
    while True:
        address = endpoints[attempt % len(endpoints)]
        channel = open_channel(address, tls)
        try:
            stub = pb_grpc.CoordinatorStub(channel)
            if not submitted:
                stub.SubmitJob(pb.SubmitJobRequest(job_yaml=job_text, job_id=job_id), metadata=metadata)
                submitted = True
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=metadata):
                lost_since = None
                on_event(event)
                if event.state in ("COMPLETED", "FAILED"):
                    return event
            error_text = f"coordinator {address} closed the job's event stream before the job ended"
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND and submitted:
                log.warning("coordinator %s does not know job %s (restarted with an in-memory store?): submitting it again",
                            address, job_id)
                submitted = False
                continue
            if error.code() not in _LOST:
                raise
            error_text = f"coordinator {address}: {error.code().name} {error.details() or ''}".strip()
        finally:
            channel.close()
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > reconnect_timeout_s:
            raise CoordinatorLost(f"{error_text}; no coordinator for {reconnect_timeout_s:.0f} s")
        attempt += 1
        time.sleep(reconnect_pause_s(attempt // len(endpoints)))


class CoordinatorLost(ConnectionError):
    """No coordinator answered for the whole reconnect window."""


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_job(
    job: JobSpec,
    job_text: str,
    *,
    coordinator: str | None,
    token: str,
    tls: TlsFiles,
    on_event: Callable[[pb.JobEvent], None],
    on_started: Callable[[str, Path], None] = lambda address, run_dir: None,
    netns: bool = False,
) -> JobOutcome:
    """Runs a job to its end, embedded or on a remote coordinator. Raises KeyboardInterrupt on
    Ctrl-C / SIGTERM after everything it started has been stopped. With `netns` every node of an
    embedded cluster is its own network host, and the job's network faults fire."""
    job_id = new_job_id(job.name)
    run_dir = Path(job.runtime.run_dir).resolve() / job_id
    cluster = None
    # Both set explicitly: a process started in the background inherits SIGINT *ignored*, and
    # Ctrl-C / SIGTERM must always unwind through the cleanup below.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    started_s = time.monotonic()
    outcome = JobOutcome(job_id, "FAILED", "", run_dir, 0.0)

    hosts = faults = log_file = storage = None
    submitted_s = time.monotonic()

    def record(event: pb.JobEvent) -> None:
        if faults is not None and event.step:
            faults.on_step(event.step)
        if event.step and event.step not in outcome.losses:
            outcome.losses[event.step] = event.loss
            outcome.step_done_s[event.step] = time.monotonic() - submitted_s
            outcome.tokens_per_s.append(event.tokens_per_s)
        outcome.generations = max(outcome.generations, event.generation)
        outcome.evictions = list(event.evictions)
        outcome.steps_lost = event.steps_lost
        outcome.incidents = [
            json_format.MessageToDict(i, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for i in event.incidents
        ]
        on_event(event)

    try:
        if coordinator is None:
            token = token or secrets.token_urlsafe(24)
            log_file = _log_to(run_dir / "coordinator.log")
            if netns:
                hosts = NetnsHosts([node.name for node in job.cluster.nodes])
            storage = StorageFaults(job, run_dir)
            cluster = EmbeddedCluster(storage.job, run_dir, token, hosts)
            cluster.start()
            faults = LauncherFaults(job.faults, lambda fault: _inject(fault, cluster, hosts, storage))
            coordinator = cluster.coordinator.address
            if hosts is not None:
                tls = TlsFiles(cert=cluster.tls.cert)
        on_started(coordinator, run_dir)
        submitted_s = time.monotonic()
        if faults is not None:
            faults.start(submitted_s)
        try:
            final = follow_job(coordinator, job_text, job_id=job_id, token=token, tls=tls, on_event=record,
                               reconnect_timeout_s=0.0 if cluster is not None else 60.0)  # fmt: skip
            outcome.state, outcome.message = final.state, final.message
        except CoordinatorLost as error:
            outcome.message = str(error)
            if cluster is not None and cluster.agent_failures():
                outcome.message += "; " + "; ".join(cluster.agent_failures())
        except grpc.RpcError as error:
            outcome.message = f"coordinator {coordinator}: {error.details() or error.code().name}"
            if cluster is not None and cluster.agent_failures():
                outcome.message += "; " + "; ".join(cluster.agent_failures())
    finally:
        if faults is not None:
            faults.close()
        if cluster is not None:
            cluster.stop()
        if hosts is not None:
            hosts.close()
        if storage is not None:
            storage.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if log_file is not None:  # the next job in this process (a chaos trial) logs to its own run
            logging.getLogger("hyrun").removeHandler(log_file)
            log_file.close()
    outcome.wall_time_s = time.monotonic() - started_s
    if run_dir.exists():
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "job_id": job_id,
                    "state": outcome.state,
                    "message": outcome.message,
                    "wall_time_s": outcome.wall_time_s,
                    "generations": outcome.generations,
                    "evictions": outcome.evictions,
                    "steps_lost": outcome.steps_lost,
                    "incidents": outcome.incidents,
                    "losses": {str(k): v for k, v in sorted(outcome.losses.items())},
                    "step_done_s": {str(k): v for k, v in sorted(outcome.step_done_s.items())},
                    "injected_faults": [vars(f) for f in faults.fired] if faults is not None else [],
                },
                indent=2,
            )
        )
    return outcome


def _inject(fault: FaultSpec, cluster: EmbeddedCluster, hosts: NetnsHosts | None, storage: StorageFaults):
    """Injects one of the job's launcher faults; returns its repair (or None)."""
    if fault.is_network:
        return network_fault(hosts, fault)
    if fault.is_storage:
        return storage.fire(fault)
    cluster.send_signal(fault)
    return None


def _log_to(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("hyrun")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler
