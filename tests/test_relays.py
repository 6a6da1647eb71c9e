"""The relay tier: the pure assignment, the batch's columns, and a real coordinator with a relay
process and simulated nodes: their heartbeats land in the card arrays through the relay, and a
SIGKILLed relay does not get its nodes marked lost (they fall back to the coordinator)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from hyrun.agent.relay import HeartbeatRoute, build_batch
from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.runtime.coordinator.relay_ingest import batch_columns, node_heartbeat
from hyrun.runtime.coordinator.relays import RelayBook, assign_relays
from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings

from conftest import FakeRendezvous

RELAYS = {"r1": "h1:1", "r2": "h2:1"}


# ------------------------------------------------------------------------------ assign_relays


def test_relays_carry_themselves_and_fill_up_to_the_fan_in_evenly():
    routed = assign_relays(["r1", "r2", "a", "b", "c", "d"], RELAYS, fan_in=3)
    assert routed["r1"] == "r1" and routed["r2"] == "r2"
    assert sorted(routed[n] for n in "abcd") == ["r1", "r1", "r2", "r2"]


def test_past_every_relays_fan_in_nodes_go_to_the_coordinator():
    routed = assign_relays(["a", "b", "c"], {"r1": "h:1"}, fan_in=2)
    assert list(routed.values()).count("r1") == 2 and list(routed.values()).count(None) == 1


def test_assignments_are_sticky_and_a_dead_relays_nodes_move():
    first = assign_relays(["a", "b", "c"], RELAYS, fan_in=10)
    again = assign_relays(["a", "b", "c", "d"], RELAYS, fan_in=10, current=first)
    assert all(again[n] == first[n] for n in "abc")
    moved = assign_relays(["a", "b", "c"], RELAYS, fan_in=10, dead_relays=frozenset({"r1"}), current=first)
    assert set(moved.values()) == {"r2"}


def test_a_node_avoids_the_relay_it_could_not_reach():
    routed = assign_relays(["a"], RELAYS, fan_in=10, current={"a": "r1"}, avoid={"a": "r1"})
    assert routed["a"] == "r2"
    assert assign_relays(["a"], {"r1": "h:1"}, fan_in=10, avoid={"a": "r1"})["a"] is None
    with pytest.raises(ValueError, match="fan-in"):
        assign_relays(["a"], RELAYS, fan_in=0)


def test_relay_book_routes_and_forgets_a_dead_relay():
    book = RelayBook(fan_in=2, silence_s=1.0)
    book.offered("r1", "h:1", now_s=0.0)
    assert book.route("a") == ("r1", "h:1")
    book.batch("r1", ["a"], now_s=0.5)
    assert book.silent(1.0) == [] and book.silent(2.0) == ["r1"]
    assert book.died("r1") == {"a"}
    assert book.route("a", failed_relay="r1") == ("", "")


# ------------------------------------------------------------------------------ the batch


def test_a_batch_round_trips_its_columns_and_each_nodes_heartbeat():
    beats = [
        pb.NodeBeat(node=f"n{n}", sent_unix_s=1.0, heartbeat=pb.Heartbeat(sequence=7 + n, cards=[
            pb.CardTelemetry(index=i, temperature_c=50 + 10 * n + i, slowdown_temperature_c=90, ecc_uncorrected=n,
                             xid_events=[79] if (n, i) == (1, 1) else [])
            for i in range(2 + n)]))
        for n in range(2)
    ]  # fmt: skip
    batch = pb.RelayBatch.FromString(build_batch("r", "h:1", 3, beats).SerializeToString())
    assert list(batch.card_counts) == [2, 3]
    assert list(batch_columns(batch).temperature_c) == [50, 51, 60, 61, 62]
    hb = node_heartbeat(batch, 1, first_card=2)
    assert hb.sequence == 8 and [c.index for c in hb.cards] == [0, 1, 2]
    assert list(hb.cards[1].xid_events) == [79] and hb.cards[2].ecc_uncorrected == 1


# ------------------------------------------------------------------------------ real servers

INTERVAL_S, TIMEOUT_S = 0.2, 1.0


class SimNode:
    """A node: a Connect stream (register, direct heartbeats) and a HeartbeatRoute to its relay."""

    def __init__(self, address: str, name: str) -> None:
        self.name, self.sent = name, 0
        self.route = HeartbeatRoute(node=name, coordinator=address, interval_s=INTERVAL_S, refresh_s=0.5)
        self.direct: queue.SimpleQueue = queue.SimpleQueue()
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(address)
        register = pb.Register(node=name, cards=[pb.CardInfo(index=i, type="cpu-sim") for i in range(8)])
        self.call = pb_grpc.CoordinatorStub(self.channel).Connect(self._messages(register))
        threading.Thread(target=self._drain_commands, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def _drain_commands(self) -> None:
        try:
            for _command in self.call:
                pass
        except grpc.RpcError:
            pass  # closed by the test (or by the coordinator, for a node it marked lost)

    def _messages(self, register):
        yield pb.AgentMessage(register=register)
        while (message := self.direct.get()) is not None:
            yield message

    def _beat(self) -> None:
        while not self.stop.wait(INTERVAL_S):
            self.sent += 1
            hb = pb.Heartbeat(sequence=self.sent, cards=[pb.CardTelemetry(index=i, temperature_c=40.0 + i) for i in range(8)])
            if not self.route.send(hb):
                self.direct.put(pb.AgentMessage(heartbeat=hb))

    def close(self) -> None:
        self.stop.set()
        self.direct.put(None)
        self.route.close()
        self.channel.close()


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_relayed_beats_land_in_the_arrays_and_a_killed_relays_nodes_are_not_lost(tmp_path):
    service = CoordinatorService(
        CoordinatorSettings(heartbeat_interval_s=INTERVAL_S, heartbeat_timeout_s=TIMEOUT_S, run_root=str(tmp_path),
                            metrics_port=None),
        open_rendezvous=FakeRendezvous,
    )  # fmt: skip
    service.start()
    relay = subprocess.Popen(
        [sys.executable, "-m", "hyrun.agent.relay", "--node", "relay-0", "--coordinator", service.address,
         "--interval", str(INTERVAL_S)], stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    nodes: list[SimNode] = []
    try:
        relays, arrays = service.servicer.relays, service.metrics.cards_health.arrays
        _wait_for(lambda: service.call(lambda: "relay-0" in relays.book.addresses), 20, "the relay to offer itself")
        nodes = [SimNode(service.address, f"node-{i}") for i in range(3)]
        names = {n.name for n in nodes}
        _wait_for(lambda: all(n.route.relay == "relay-0" for n in nodes), 15, "the nodes to be routed to the relay")
        relayed = service.call(lambda: relays.delays.total)
        _wait_for(lambda: service.call(lambda: relays.delays.total) >= relayed + 2 * len(nodes), 15,
                  "two rounds of beats through the relay")  # fmt: skip
        assert service.call(lambda: relays.book.carried("relay-0")) == names
        # Through the relay into the arrays: every card of every node, and a delay measured per beat.
        temps = service.call(lambda: [arrays.temperature_c[arrays.slot_start[arrays.node_index[n]] + 7] for n in sorted(names)])
        assert temps == [47.0, 47.0, 47.0]

        os.killpg(relay.pid, signal.SIGKILL)
        relay.wait(timeout=10)
        beats_then = service.call(lambda: {n: int(arrays.beats[arrays.node_index[n]]) for n in names})
        # Several heartbeat timeouts later: every node still alive, its beats arriving directly.
        settle_until = time.monotonic() + 3 * TIMEOUT_S
        _wait_for(lambda: time.monotonic() > settle_until, 10, "the settling period")
        alive = service.call(lambda: {n: service.servicer.membership.nodes[n].alive for n in names})
        assert alive == {n: True for n in names}
        beats_now = service.call(lambda: {n: int(arrays.beats[arrays.node_index[n]]) for n in names})
        assert all(beats_now[n] > beats_then[n] + 5 for n in names)
        assert all(n.route.relay == "" for n in nodes)
        assert service.call(lambda: "relay-0" in relays.book.dead)
    finally:
        for node in nodes:
            node.close()
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(timeout=10)
        service.stop()


@pytest.mark.timeout(30)
def test_a_node_silent_without_a_job_is_marked_lost_after_the_timeout(tmp_path):
    service = CoordinatorService(
        CoordinatorSettings(heartbeat_interval_s=INTERVAL_S, heartbeat_timeout_s=TIMEOUT_S, run_root=str(tmp_path),
                            metrics_port=None),
        open_rendezvous=FakeRendezvous,
    )  # fmt: skip
    service.start()
    node = SimNode(service.address, "node-q")
    try:
        membership = service.servicer.membership
        _wait_for(lambda: service.call(lambda: membership.nodes.get("node-q") is not None
                                       and membership.nodes["node-q"].heartbeats > 2), 10, "beats")  # fmt: skip
        node.stop.set()
        silent_since = time.monotonic()
        _wait_for(lambda: service.call(lambda: not membership.nodes["node-q"].alive), 10, "the node to be marked lost")
        assert time.monotonic() - silent_since <= TIMEOUT_S + 1.0
    finally:
        node.close()
        service.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_real_agents_beat_through_an_agent_acting_as_relay_and_outlive_it(tmp_path, launched, tls):
    from hyrun.common.security import TlsFiles
    from hyrun.runtime.network.tls import write_self_signed

    secure: list[str] = []
    relay_tls: list[str] = []
    settings = {}
    if tls:  # as on a real cluster: TLS and a job token to the coordinator and to the relay alike
        cert, key = write_self_signed(tmp_path / "tls", "127.0.0.1")
        (tmp_path / "token").write_text("job-secret")
        settings = {"tls": TlsFiles(cert=cert, key=key), "token": "job-secret"}
        secure = ["--tls-ca", str(cert), "--token-file", str(tmp_path / "token")]
        relay_tls = ["--relay-tls-cert", str(cert), "--relay-tls-key", str(key)]
    service = CoordinatorService(
        CoordinatorSettings(heartbeat_interval_s=INTERVAL_S, heartbeat_timeout_s=TIMEOUT_S, run_root=str(tmp_path),
                            metrics_port=None, **settings),
        open_rendezvous=FakeRendezvous,
    )  # fmt: skip
    service.start()
    common = ["--coordinator", service.address, "--simulate", "cpu-sim:2", "--host", "127.0.0.1", "--warm-workers", "0",
              "--heartbeat-interval", str(INTERVAL_S), "--via-relays", *secure]  # fmt: skip
    try:
        relays, membership = service.servicer.relays, service.servicer.membership
        relay_agent = launched("agent", "--node", "relay-a", "--relay-listen", "127.0.0.1:0", *relay_tls, *common)
        _wait_for(lambda: service.call(lambda: "relay-a" in relays.book.addresses), 20, "the agent to offer itself as relay")
        for node in ("node-b", "node-c"):
            launched("agent", "--node", node, *common)
        # Nodes ask for a route at start and every 30 beats: within ~6 s they beat through relay-a.
        _wait_for(lambda: service.call(lambda: {"node-b", "node-c"} <= relays.book.carried("relay-a")), 20,
                  "the nodes routed to the relay agent")  # fmt: skip
        relayed = service.call(lambda: relays.delays.total)
        _wait_for(lambda: service.call(lambda: relays.delays.total) >= relayed + 6, 10, "beats through the relay agent")
        os.killpg(relay_agent.proc.pid, signal.SIGKILL)
        relay_agent.proc.wait(timeout=10)
        _wait_for(lambda: service.call(lambda: not membership.nodes["relay-a"].alive), 10, "the relay's own node lost")
        settle_until = time.monotonic() + 2 * TIMEOUT_S
        _wait_for(lambda: time.monotonic() > settle_until, 10, "the settling period")
        assert service.call(lambda: [membership.nodes[n].alive for n in ("node-b", "node-c")]) == [True, True]
    finally:
        service.stop()


def test_a_running_jobs_nodes_reach_the_health_book_through_a_batch():
    from types import SimpleNamespace

    from hyrun.runtime.card_metrics import CardCollector
    from hyrun.runtime.coordinator.actions import CardRef
    from hyrun.runtime.coordinator.health import HealthBook
    from hyrun.runtime.coordinator.membership import Membership
    from hyrun.runtime.coordinator.relay_ingest import RelayIngest
    from hyrun.runtime.jobfile import HealthSection

    job = SimpleNamespace(ended=False, spec=SimpleNamespace(cluster=SimpleNamespace(nodes=[SimpleNamespace(name="in-job")])))
    orch = SimpleNamespace(job=job, health=HealthBook(HealthSection()), stalled_until_s=float("-inf"))
    ingest = RelayIngest(cards=CardCollector(), membership=Membership(), orchestrator=orch, heartbeat_timeout_s=5.0, fan_in=10)
    beats = [pb.NodeBeat(node=n, sent_unix_s=time.time(), heartbeat=pb.Heartbeat(sequence=1, cards=[
        pb.CardTelemetry(index=0, temperature_c=80.0, slowdown_temperature_c=90.0, xid_events=[79])])) for n in ("other", "in-job")]  # fmt: skip
    ingest.batch(build_batch("r", "h:1", 1, beats), now_s=3.0, now_unix_s=time.time())
    assert set(orch.health.cards) == {CardRef("in-job", 0)}  # the fleet's other nodes stay in the arrays only
    view = orch.health.cards[CardRef("in-job", 0)].view()
    assert view.temperatures == ((3.0, 80.0),) and view.xids == (79,)
