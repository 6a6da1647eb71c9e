"""Overload is not failure: a coordinator whose own loop stalls, or a box whose cores are all
busy, must not throw out healthy nodes. Real processes and a real coordinator; every wait is for
a condition with a deadline, never a fixed sleep standing in for one."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import grpc
import pytest

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings
from hyrun.runtime.jobfile import parse_job

from conftest import FakeRendezvous, job_dict


class FakeAgent:
    """One node's stream, speaking the agent protocol: heartbeats every `interval_s` from its own
    thread, and for each StartGeneration a step report per rank and step (a generation whose
    workers train), so the coordinator has a running generation to evict from."""

    def __init__(self, address: str, node: str, cards: int, interval_s: float) -> None:
        self.node, self.cards, self.interval_s = node, cards, interval_s
        self.outbox: queue.Queue = queue.Queue()
        self.stopped = threading.Event()
        self.quiet = threading.Event()  # set: send no heartbeats (what a starved coordinator host sees)
        self.commands: list[str] = []
        self.channel = grpc.insecure_channel(address)
        stub = pb_grpc.CoordinatorStub(self.channel)
        self.outbox.put(pb.AgentMessage(register=pb.Register(
            node=node, cards=[pb.CardInfo(index=i, type="cpu-sim", memory_bytes=1 << 30, speed=1.0, simulated=True)
                              for i in range(cards)], host="127.0.0.1", agent_pid=1)))  # fmt: skip
        self.stream = stub.Connect(iter(self.outbox.get, None))
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._beat, self._read)]
        for thread in self.threads:
            thread.start()

    def _beat(self) -> None:
        sequence = 0
        while not self.stopped.wait(self.interval_s):
            if self.quiet.is_set():
                continue
            sequence += 1
            self.outbox.put(pb.AgentMessage(heartbeat=pb.Heartbeat(sequence=sequence)))

    def _read(self) -> None:
        try:
            for command in self.stream:
                kind = command.WhichOneof("body")
                self.commands.append(kind)
                if kind == "start":
                    for step in (1, 2):
                        for rank in command.start.ranks:
                            report = pb.StepReport(generation=command.start.generation, rank=rank.rank, step=step,
                                                   loss=2.0, tokens=32, step_time_s=0.1, checkpoint_step=-1)
                            self.outbox.put(pb.AgentMessage(step=report))
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.stopped.set()
        self.outbox.put(None)
        self.channel.close()


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_stalled_coordinator_loop_evicts_nobody(tmp_path):
    timeout_s = 1.0
    service = CoordinatorService(
        CoordinatorSettings(heartbeat_interval_s=0.1, heartbeat_timeout_s=timeout_s, run_root=str(tmp_path),
                            metrics_port=None),
        open_rendezvous=FakeRendezvous,
    )  # fmt: skip
    service.start()
    agents = []
    try:
        orch = service.servicer.orchestrator
        spec = parse_job(job_dict(training={"steps": 1000}))
        service.call(orch.submit, spec, time.monotonic())
        agents = [FakeAgent(service.address, name, 2, interval_s=0.1) for name in ("node-a", "node-b")]
        _wait_for(lambda: orch.job.generation is not None and orch.job.generation.state.value == "RUNNING", 20,
                  "the generation to run")
        # Block the coordinator's event loop for 3x the heartbeat timeout. The agents stay quiet
        # meanwhile, so that when the loop wakes, the newest beat it holds is that old (as on a
        # host too starved to read its sockets), whatever order it then runs its callbacks in.
        for agent in agents:
            agent.quiet.set()
        service.call(time.sleep, 3 * timeout_s)
        for agent in agents:
            agent.quiet.clear()
        # Then give policy several heartbeat timeouts to (wrongly) act on the stall.
        settle_until = time.monotonic() + 3 * timeout_s
        _wait_for(lambda: time.monotonic() > settle_until, 10, "the settling period")
        state = service.call(lambda: (orch.job.generation.number, dict(orch.job.evicted),
                                      [n.alive for n in orch.membership.nodes.values()]))
        assert state == (1, {}, [True, True])
        assert service.metrics.loop_lag_seconds._value.get() >= 0.0
        assert all("stop" not in agent.commands for agent in agents)
    finally:
        for agent in agents:
            agent.close()
        service.stop()


def _burners(count: int, limit_s: float) -> list[subprocess.Popen]:
    """CPU burners at the workers' own priority, each bounded by `limit_s`."""
    code = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(count)]


@pytest.mark.timeout(240)
def test_a_job_starts_and_trains_on_a_box_whose_every_core_is_busy(write_job, launched, tmp_path):
    import os

    burners = _burners(os.cpu_count() or 2, limit_s=200)
    try:
        job = job_dict(training={"steps": 4}, checkpoint={"interval_steps": 2})
        result = launched("launch", str(write_job(job)), "--no-progress")
        _, stderr = result.proc.communicate(timeout=200)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert result.proc.returncode == 0, stderr
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["generations"] == 1 and summary["evictions"] == [], summary["evictions"]
    coordinator_log = next((tmp_path / "runs").glob("*/coordinator.log")).read_text()
    assert " lost:" not in coordinator_log
