"""Self-healing end to end: a card that dies or hangs is named, evicted, and the job finishes all
its steps on the remaining cards."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from conftest import job_dict


def _run(write_job, launched, tmp_path, job: dict) -> dict:
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=150)
    assert result.proc.returncode == 0, stderr
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    assert result.alive_seen() == []
    return json.loads(summary.read_text())


@pytest.mark.timeout(180)
def test_killed_worker_is_evicted_and_the_resumed_run_matches_an_uninterrupted_one(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 8},
        checkpoint={"interval_steps": 2},
        faults=[{"kind": "kill", "node": "node-b", "card": 1, "at_step": 6}],
    )
    summary = _run(write_job, launched, tmp_path, job)
    assert summary["generations"] == 2
    assert len(summary["evictions"]) == 1 and summary["evictions"][0].startswith("node-b/card1: rank 3 on node node-b card 1 (cpu-sim) killed by SIGKILL")
    (incident,) = summary["incidents"]
    assert int(incident["resumed_step"]) in (3, 5)  # from the checkpoint of step 2 or 4, not from scratch
    assert summary["steps_lost"] <= 4

    # Every step's loss, before and after the resume on 3 cards, equals one uninterrupted process
    # training the same global batches: parameters, optimizer, expert LRs and data position came back.
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job_dict(training={"steps": 8})), RankWork(), reference)
    for record in reference.history:
        assert summary["losses"][str(record.step)] == pytest.approx(record.loss, rel=1e-4), record.step


@pytest.mark.timeout(180)
def test_hung_worker_is_located_and_evicted(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 6},
        fault_tolerance={"hang_timeout_s": 3.0},
        faults=[{"kind": "hang", "node": "node-a", "card": 1, "at_step": 3}],
    )
    summary = _run(write_job, launched, tmp_path, job)
    assert summary["generations"] == 2
    assert [e.split(":")[0] for e in summary["evictions"]] == ["node-a/card1"]
    assert "hung" in summary["evictions"][0]


@pytest.mark.timeout(240)
def test_xid_nan_and_heat_each_evict_the_right_card(write_job, launched, tmp_path):
    """Three hardware faults in turn, one per generation, each on a different card."""
    job = job_dict(
        training={"steps": 16},
        checkpoint={"interval_steps": 50},  # drains must checkpoint on demand, not by interval
        faults=[
            {"kind": "xid", "node": "node-b", "card": 0, "at_step": 2, "xid": 79, "generation": 1},
            {"kind": "nan_grad", "node": "node-a", "card": 1, "at_step": 2, "repeat_steps": 3, "generation": 2},
            {"kind": "temperature_ramp", "node": "node-a", "card": 0, "at_step": 2, "c_per_s": 40.0, "generation": 3},
        ],
    )
    summary = _run(write_job, launched, tmp_path, job)
    evicted = {e.split(":")[0]: e for e in summary["evictions"]}
    assert list(evicted) == ["node-b/card0", "node-a/card1", "node-a/card0"], summary["evictions"]
    assert "fatal XID 79" in evicted["node-b/card0"]
    assert "silent data corruption" in evicted["node-a/card1"]
    assert "temperature" in evicted["node-a/card0"]
    assert summary["generations"] == 4
    assert sorted(map(int, summary["losses"])) == list(range(1, 17))
    drains = [i for i in summary["incidents"] if i["verdict"] == "drain"]
    assert len(drains) == 2 and all(int(i["steps_lost"]) == 0 for i in drains), summary["incidents"]


@pytest.mark.timeout(180)
def test_a_card_slowed_to_a_third_is_replanned_around(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 14, "global_batch": 16},
        # A 2x bar: on this loaded 2-core box a healthy card can read 1.6x slow for a few steps.
        health={"straggler_window_steps": 3, "straggler_ratio": 2.0, "straggler_drain_ratio": 5.0},
        faults=[{"kind": "slow", "node": "node-b", "card": 1, "at_step": 3, "speed": 0.3}],
    )
    summary = _run(write_job, launched, tmp_path, job)
    incident = summary["incidents"][0]
    assert incident["verdict"] == "replan" and incident["cards"] == ["node-b/card1"]
    assert "straggler" in incident["reason"] and int(incident["steps_lost"]) == 0
    # A second replan may refine the speed; it must be about the same card.
    assert all(i["verdict"] == "replan" and i["cards"] == ["node-b/card1"] for i in summary["incidents"])
    assert summary["evictions"] == []  # it stays in the job, with less work
    assert sorted(map(int, summary["losses"])) == list(range(1, 15))


@pytest.mark.timeout(180)
def test_a_killed_agent_takes_its_node_out_and_the_job_finishes_on_the_other(write_job, launched, tmp_path):
    job = job_dict(training={"steps": 150})
    result = launched("launch", str(write_job(job)), "--no-progress")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        logs = list((tmp_path / "runs").glob("*/generation-1/*/rank-*.log"))
        if len(logs) == 4 and all("first step done" in log.read_text() for log in logs):
            break
        time.sleep(0.2)
    (agent,) = [p for p in result.descendants() if "agent" in p.cmdline() and "node-b" in p.cmdline()]
    agent.send_signal(signal.SIGKILL)
    _, stderr = result.proc.communicate(timeout=150)
    assert result.proc.returncode == 0, stderr
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    data = json.loads(summary.read_text())
    assert sorted(e.split(":")[0] for e in data["evictions"]) == ["node-b/card0", "node-b/card1"], data["evictions"]
    assert max(map(int, data["losses"])) == 150
    assert result.alive_seen() == []  # the dead agent's workers died with it


@pytest.mark.timeout(240)
def test_signals_sent_from_outside_to_a_worker_and_to_an_agent_are_survived(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 12},
        checkpoint={"interval_steps": 2},
        faults=[
            {"kind": "signal", "node": "node-a", "card": 1, "at_step": 3, "signal": "SIGSEGV", "target": "worker"},
            {"kind": "signal", "node": "node-b", "at_step": 8, "signal": "SIGKILL", "target": "agent"},
        ],
    )
    summary = _run(write_job, launched, tmp_path, job)
    assert sorted(map(int, summary["losses"])) == list(range(1, 13))
    evicted = {e.split(":")[0]: e for e in summary["evictions"]}
    assert "SIGSEGV" in evicted["node-a/card1"], summary["evictions"]
    # The node whose agent died is lost: its cards that the running generation used are evicted.
    assert any(card.startswith("node-b/") and "node node-b lost" in e for card, e in evicted.items()), evicted
    assert [f["kind"] for f in summary["injected_faults"]] == ["signal", "signal"]


@pytest.mark.timeout(240)
def test_a_damaged_newest_checkpoint_is_refused_and_the_one_before_it_resumes_exactly(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 10},
        checkpoint={"interval_steps": 2, "keep_last": 10},
        faults=[{"kind": "corrupt_checkpoint", "node": "node-b", "card": 1, "at_step": 7, "damage": "flip"}],
    )
    summary = _run(write_job, launched, tmp_path, job)
    (incident,) = summary["incidents"]
    assert int(incident["resumed_step"]) in (3, 5)  # the checkpoint before the damaged one (4 or 2), not it
    logs = "".join(p.read_text() for p in (tmp_path / "runs").glob("*/generation-2/*/rank-*.log"))
    assert "refused newer" in logs
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job_dict(training={"steps": 10})), RankWork(), reference)
    for record in reference.history:
        assert summary["losses"][str(record.step)] == pytest.approx(record.loss, rel=1e-4), record.step
