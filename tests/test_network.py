"""Every node its own host: real network namespaces, veth links to a data and a control bridge, real
`tc` bandwidth caps and links taken down. Needs root (CAP_NET_ADMIN) and iproute2; skips saying why
without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyrun.runtime.coordinator.actions import Evidence, VerdictKind
from hyrun.runtime.coordinator.planning import Measured, planner_inputs
from hyrun.runtime.coordinator.link_policy import congested_links, link_back, link_down, link_trend
from hyrun.runtime.coordinator.view import NicSampleView
from hyrun.runtime.jobfile import HealthSection, parse_job
from hyrun.runtime.network.hosts import run, sweep_stale, unavailable_reason
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from conftest import job_dict

needs_netns = pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
HEARTBEAT_TIMEOUT_S = 3.0


# ---- the link rules, pure ------------------------------------------------------------------------


def _samples(rates_mbit: list[float], queued: list[bool], carrier: bool = True) -> tuple[NicSampleView, ...]:
    """One sample per heartbeat (1 s apart) moving `rates_mbit[i]` in the interval before it."""
    out, tx, overlimits = [NicSampleView(0.0, "data0", carrier, 0, 0, 0)], 0, 0
    for i, (rate, held) in enumerate(zip(rates_mbit, queued), start=1):
        tx += int(rate * 1e6 / 8)
        overlimits += 7 if held else 0
        out.append(NicSampleView(float(i), "data0", carrier, tx, overlimits, 0))
    return tuple(out)


def test_a_link_whose_queue_holds_back_and_moves_far_less_than_peers_reached_is_congested():
    health = HealthSection()
    fast, before = [50.0] * 5, [50.0] * 5
    nics = {"a": _samples(fast + fast, [False] * 10), "b": _samples(fast + fast, [False] * 10),
            "c": _samples(before + [4.0] * 5, [False] * 5 + [True] * 5)}
    found = congested_links(nics, health)
    assert list(found) == ["c"]
    kind, evidence = found["c"]
    assert kind is VerdictKind.DRAIN  # 4 Mbit/s where peers reached 50: far off
    described = evidence.describe()
    assert "data0" in described and "5 of the last 5" in described and "4.0 Mbit/s" in described


def test_a_congested_link_not_far_off_is_replanned_with_its_measured_bandwidth():
    nics = {"a": _samples([50.0] * 10, [False] * 10), "c": _samples([50.0] * 5 + [30.0] * 5, [False] * 5 + [True] * 5)}
    ((kind, evidence),) = congested_links(nics, HealthSection()).values()
    assert kind is VerdictKind.REPLAN and evidence["mbit"] == pytest.approx(30.0, rel=1e-3)


def test_the_planner_is_given_a_congested_links_measured_bandwidth():
    job = parse_job(_four_node_job("plan", steps=2))
    cluster, _, _ = planner_inputs(job)
    measured = Measured(link_mbit={"n2": 40.0}).apply(cluster)
    by_node = {card.node: card.spec.inter_node_bandwidth_bytes_per_s for card in measured.cards}
    assert by_node["n2"] == pytest.approx(40e6 / 8)
    assert by_node["n0"] == next(c.spec for c in cluster.cards if c.node == "n0").inter_node_bandwidth_bytes_per_s


@pytest.mark.parametrize("case", ["peers also queue", "too few strikes", "rate near peers", "too few samples"])
def test_congestion_needs_all_of_its_conditions(case):
    health = HealthSection()
    slow_queued = _samples([50.0] * 5 + [4.0] * 5, [False] * 5 + [True] * 5)
    nics = {"a": _samples([50.0] * 10, [False] * 10), "c": slow_queued}
    if case == "peers also queue":
        nics["a"] = _samples([50.0] * 10, [False] * 5 + [True] * 5)
    elif case == "too few strikes":
        nics["c"] = _samples([50.0] * 5 + [4.0] * 5, [False] * 8 + [True] * 2)
    elif case == "rate near peers":
        nics["c"] = _samples([50.0] * 10, [False] * 5 + [True] * 5)
    elif case == "too few samples":
        nics = {node: samples[:health.link_window_samples] for node, samples in nics.items()}
    assert congested_links(nics, health) == {}


def test_a_links_bandwidth_is_fitted_with_its_trend():
    now_mbit, slope = link_trend(_samples([100, 90, 80, 70, 60], [False] * 5))
    assert now_mbit == pytest.approx(55.0) and slope == pytest.approx(-10.0)


def test_a_congested_link_still_above_the_bar_but_falling_fast_is_replanned_before_it_gets_there():
    settings = HealthSection(link_window_samples=5, link_strikes=3, link_replan_ratio=0.5, link_drain_ratio=0.1)
    healthy = _samples([100] * 8, [False] * 8)
    falling = _samples([100, 100, 100, 95, 80, 70, 60, 55], [False, False, False, True, True, True, True, True])
    steady = _samples([100, 100, 100, 60, 60, 60, 60, 60], [False, False, False, True, True, True, True, True])
    found = congested_links({"a": healthy, "b": healthy, "c": falling}, settings)
    kind, evidence = found["c"]
    assert kind is VerdictKind.REPLAN and evidence["trend_mbit_per_s"] < -5
    assert 10.0 <= evidence["mbit"] < 50.0 and "trend -" in evidence.describe()
    assert congested_links({"a": healthy, "b": healthy, "c": steady}, settings) == {}  # above the bar, not falling


def test_carrier_lost_is_a_link_down_and_two_samples_with_carrier_bring_it_back():
    down = _samples([10.0, 10.0], [False, False], carrier=False)
    assert isinstance(link_down("a", down), Evidence) and not link_back("a", down)
    up = down + (NicSampleView(3.0, "data0", True, 0, 0, 0),)
    assert link_down("a", up) is None and not link_back("a", up)  # one sample could be a flap
    assert link_back("a", up + (NicSampleView(4.0, "data0", True, 0, 0, 0),))


# ---- namespaces --------------------------------------------------------------------------------------


def test_hosts_are_reachable_and_removed_and_stale_ones_are_swept(netns_hosts):
    with netns_hosts(["a", "b"]) as hosts:
        b = hosts.hosts["b"]
        assert run("ip", "netns", "list").count(hosts.tag) == 2
        server = subprocess.Popen(hosts.command("b", ["python", "-c", (
            "import socket; s = socket.create_server(('%s', 0)); print(s.getsockname()[1], flush=True); "
            "c, _ = s.accept(); c.sendall(c.recv(5))") % b.data_ip]), stdout=subprocess.PIPE, text=True)
        try:
            port = server.stdout.readline().strip()
            reply = subprocess.run(hosts.command("a", ["python", "-c", (
                "import socket; c = socket.create_connection(('%s', %s), timeout=10); c.sendall(b'hello'); "
                "print(c.recv(5).decode())") % (b.data_ip, port)]), capture_output=True, text=True, timeout=30)
            assert reply.stdout.strip() == "hello", reply.stderr
        finally:
            server.kill()
            server.wait()
        tag = hosts.tag
    assert tag not in run("ip", "netns", "list") and tag not in run("ip", "link", "show")
    # A namespace left by a process that no longer exists (pid 2**22 + 1 is above pid_max) is swept.
    stale = f"hy{2**22 + 1}n0"
    run("ip", "netns", "add", stale)
    assert stale in sweep_stale() and stale not in run("ip", "netns", "list")


def _four_node_job(name: str, steps: int, faults: list[dict] | None = None) -> dict:
    return job_dict(
        name=name,
        cluster={"nodes": [{"name": f"n{i}", "cards": [{"type": "cpu-sim", "count": 1}]} for i in range(4)]},
        training={"steps": steps, "global_batch": 8},
        checkpoint={"interval_steps": 2},
        runtime={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S},
        faults=faults or [],
    )


def _run(launched, write_job, tmp_path, job: dict, timeout_s: float) -> dict:
    result = launched("launch", str(write_job(job, f"{job['name']}.yaml")), "--no-progress", "--netns")
    _, stderr = result.proc.communicate(timeout=timeout_s)
    assert result.proc.returncode == 0, stderr[-4000:]
    (summary,) = (tmp_path / "runs").glob(f"{job['name']}-*/summary.json")
    assert not [line for line in run("ip", "netns", "list").splitlines() if line.startswith("hy")]
    return json.loads(summary.read_text())


@needs_netns
@pytest.mark.timeout(300)
def test_four_nodes_in_their_own_namespaces_train_exactly_like_one_process(launched, write_job, tmp_path):
    job = _four_node_job("plain", steps=3)
    summary = _run(launched, write_job, tmp_path, job, 280)
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job), RankWork(), reference)
    for record in reference.history:
        assert summary["losses"][str(record.step)] == pytest.approx(record.loss, rel=1e-5, abs=1e-6), record.step


def _incidents(summary: dict, cause_text: str) -> list[dict]:
    return [i for i in summary["incidents"] if cause_text in i["reason"]]


@needs_netns
@pytest.mark.timeout(300)
def test_a_control_plane_cut_evicts_nothing(launched, write_job, tmp_path):
    job = _four_node_job("cut", steps=10, faults=[
        {"kind": "coordinator_unreachable", "node": "n1", "at_step": 3, "duration_s": 3 * HEARTBEAT_TIMEOUT_S},
    ])
    summary = _run(launched, write_job, tmp_path, job, 280)
    assert sorted(map(int, summary["losses"])) == list(range(1, 11))
    # n1's agent was unreachable for 3x the heartbeat timeout; its ranks kept training with their
    # peers (the data network was fine), so nothing was evicted and one generation did it all.
    assert summary["incidents"] == [] and summary["evictions"] == [], summary["incidents"]
    assert summary["generations"] == 1


# Its own job: during a control cut the coordinator hears of steps late (the cut node's reports wait),
# so a fault keyed by a step would fire later than that step.
@needs_netns
@pytest.mark.timeout(420)
def test_a_capped_link_is_named_congested_and_drained(launched, write_job, tmp_path):
    job = _four_node_job("cap", steps=16, faults=[{"kind": "link_slow", "node": "n2", "at_step": 6, "mbit": 4}])
    summary = _run(launched, write_job, tmp_path, job, 400)
    assert sorted(map(int, summary["losses"])) == list(range(1, 17))
    # Named as congested within 10 steps, with the link and the rates as evidence, and drained.
    (congested,) = _incidents(summary, "congested")
    assert congested["cards"] == ["n2/card0"] and congested["verdict"] == "drain"
    assert "data0" in congested["reason"] and "Mbit/s" in congested["reason"]
    assert 6 <= int(congested["step_at_failure"]) + 1 <= 6 + 10
    assert [e for e in summary["evictions"] if e.startswith("n2/card0")]


@needs_netns
@pytest.mark.timeout(420)
def test_a_link_down_for_a_while_comes_back_and_one_down_for_good_is_evicted(launched, write_job, tmp_path):
    # n3 goes down 8 steps before the end: steps are quick on an idle box, and the launcher hears of
    # step 9 (and cuts the link) a little after the workers finish it.
    job = _four_node_job("links-down", steps=18, faults=[
        {"kind": "link_down", "node": "n1", "at_step": 3, "duration_s": 5},
        {"kind": "link_down", "node": "n3", "at_step": 10},
    ])
    summary = _run(launched, write_job, tmp_path, job, 400)
    assert sorted(map(int, summary["losses"])) == list(range(1, 19))
    fired = {f["node"]: f["at_job_s"] for f in summary["injected_faults"]}
    downs = _incidents(summary, "is down (no carrier)")
    assert [i["cards"] for i in downs] == [["n1/card0"], ["n3/card0"]]
    for incident in downs:  # detected within the heartbeat timeout + 2 s of the link going down
        node = incident["cards"][0].split("/")[0]
        assert incident["detected_at_s"] - fired[node] <= HEARTBEAT_TIMEOUT_S + 2.0, incident
    (back,) = _incidents(summary, "up again")
    assert back["cards"] == ["n1/card0"] and back["verdict"] == "join"
    assert summary["evictions"] and all(e.startswith("n3/card0") for e in summary["evictions"])


def test_network_faults_without_netns_are_refused_before_anything_starts(write_job, tmp_path):
    job = write_job(_four_node_job("refused", steps=2, faults=[{"kind": "link_down", "node": "n1", "at_step": 2}]))
    out = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "launch", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and "link_down on n1" in out.stderr and "--netns" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_rdma_port_counters_are_summed_and_their_credit_waits_count_as_congestion(tmp_path):
    from hyrun.agent.nic import rdma_counters

    for device, port, words, wait in (("mlx5_0", 1, 100, 7), ("mlx5_1", 1, 50, 0)):
        counters = tmp_path / device / "ports" / str(port) / "counters"
        counters.mkdir(parents=True)
        for name, value in (("port_xmit_data", words), ("port_rcv_data", 2 * words), ("port_xmit_wait", wait),
                            ("link_downed", 0)):
            (counters / name).write_text(f"{value}\n")
    assert rdma_counters(tmp_path) == {"rdma_tx_bytes": 600, "rdma_rx_bytes": 1200, "rdma_xmit_wait": 7,
                                       "rdma_link_downed": 0}
    assert rdma_counters(tmp_path / "absent") == {"rdma_tx_bytes": 0, "rdma_rx_bytes": 0, "rdma_xmit_wait": 0,
                                                  "rdma_link_downed": 0}
    # A link whose RDMA port keeps waiting for credit (no kernel queue involved) is congested too.
    fast = _samples([50.0] * 10, [False] * 10)
    waiting = [NicSampleView(s.time_s, "ib0", True, 0, 0, 0, rdma_tx_bytes=s.tx_bytes if i <= 5 else s.tx_bytes // 10,
                             rdma_xmit_wait=0 if i <= 5 else 100 * i) for i, s in enumerate(fast)]
    ((kind, evidence),) = congested_links({"a": fast, "b": fast, "c": tuple(waiting)}, HealthSection()).values()
    assert kind is VerdictKind.DRAIN and evidence["interface"] == "ib0"


def test_time_keyed_faults_fire_at_their_second_and_are_repaired(monkeypatch):
    import time

    from hyrun.runtime.jobfile import FaultSpec
    from hyrun.runtime.launch_faults import LauncherFaults
    from hyrun.runtime.network import faults as network_faults

    changes: list[tuple[str, str, bool, float]] = []
    monkeypatch.setattr(network_faults, "set_link",
                        lambda hosts, node, link, up: changes.append((node, link, up, time.monotonic())))  # fmt: skip
    specs = [FaultSpec(kind="link_down", node="n1", at_s=0.3, duration_s=0.3), FaultSpec(kind="partition", node="n2", at_step=4)]
    faults = LauncherFaults(specs, lambda fault: network_faults.network_fault(None, fault))
    started = time.monotonic()
    faults.start(started)
    deadline = started + 10
    while len(changes) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    (down, up) = changes
    assert down[:3] == ("n1", "data", False) and down[3] - started >= 0.3
    assert up[:3] == ("n1", "data", True) and up[3] - down[3] >= 0.3
    assert [f.kind for f in faults.fired] == ["link_down"]  # the step-keyed one waits for its step
    faults.on_step(3)
    assert changes[-1][:3] == ("n2", "both", False)
    faults.close()


@pytest.mark.parametrize(
    ("fault", "message"),
    [({"kind": "link_down", "node": "n1"}, "exactly one of at_step and at_s"),
     ({"kind": "link_down", "node": "n1", "at_step": 2, "at_s": 1.0}, "exactly one of at_step and at_s"),
     ({"kind": "kill", "node": "n1", "at_s": 1.0}, "at_s is for faults from outside")],
)  # fmt: skip
def test_a_fault_fires_at_a_step_or_a_second_not_both(fault, message):
    from hyrun.runtime.jobfile import FaultSpec

    with pytest.raises(ValueError, match=message):
        FaultSpec(**fault)
