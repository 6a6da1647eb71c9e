"""End to end: `hyrun launch` on an embedded cluster of 2 agents x 2 simulated cards on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from conftest import job_dict


def _summary(tmp_path) -> dict:
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    return json.loads(summary.read_text())


def _wait_for_ranks(launched, tmp_path, timeout_s: float = 60) -> dict[int, int]:
    """Until every rank has joined its process group (training is under way): rank -> pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        launched.descendants()  # remember every process, spares included, for the final check
        logs = list((tmp_path / "runs").glob("*/generation-1/*/rank-*.log"))
        joined = [re.search(r"as rank (\d+) .*\(pid (\d+)\)", log.read_text()) for log in logs]
        if len(logs) == 4 and all(joined):
            return {int(m.group(1)): int(m.group(2)) for m in joined}
        time.sleep(0.1)
    raise AssertionError("the ranks never joined their process group")


@pytest.mark.timeout(120)
def test_data_parallel_loss_equals_single_process(write_job, launched, tmp_path):
    job = job_dict()
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=110)
    assert result.proc.returncode == 0, stderr
    losses = _summary(tmp_path)["losses"]
    assert sorted(int(step) for step in losses) == [1, 2, 3, 4]

    # The same model on the same global batch, one process, all 4 micro-batches in turn.
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job), RankWork(), reference)
    for record in reference.history:
        assert losses[str(record.step)] == pytest.approx(record.loss, rel=1e-5, abs=1e-6), record.step
    assert losses["4"] < losses["1"]


@pytest.mark.timeout(120)
def test_without_fault_tolerance_a_sigkilled_worker_fails_the_job_fast_and_leaves_nothing(write_job, launched, tmp_path):
    job = job_dict(training={"steps": 100_000}, fault_tolerance={"enabled": False})
    result = launched("launch", str(write_job(job)), "--no-progress")
    pids = _wait_for_ranks(result, tmp_path)
    killed_at = time.monotonic()
    os.kill(pids[3], signal.SIGKILL)
    _, stderr = result.proc.communicate(timeout=30)
    elapsed_s = time.monotonic() - killed_at
    assert result.proc.returncode == 1
    assert "rank 3 on node node-b card 1" in stderr and "SIGKILL" in stderr, stderr
    assert elapsed_s < 10, f"took {elapsed_s:.1f} s to notice and stop"
    assert result.alive_seen() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_launcher_leaves_no_process(write_job, launched, tmp_path, how):
    job = job_dict(training={"steps": 100_000})
    result = launched("launch", str(write_job(job)), "--no-progress")
    _wait_for_ranks(result, tmp_path)
    result.proc.send_signal(how)
    result.proc.communicate(timeout=30)
    if how is not signal.SIGKILL:
        assert result.proc.returncode == 130
    # SIGKILL gives the launcher no chance to clean up: agents and workers must die on their own.
    deadline = time.monotonic() + 15
    while result.alive_seen() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert result.alive_seen() == []


@pytest.mark.timeout(300)
def test_status_drain_and_readmit_from_the_command_line(write_job, launched, tmp_path):
    job = job_dict(training={"steps": 100_000})
    result = launched("launch", str(write_job(job)), "--no-progress")
    _wait_for_ranks(result, tmp_path)
    (run_dir,) = (tmp_path / "runs").glob("t-*")

    def status() -> str:
        command = launched("status", "--run", str(run_dir))
        out, err = command.proc.communicate(timeout=60)
        assert command.proc.returncode == 0, err
        return out

    out = status()
    assert "RUNNING" in out and "rank 3: node-b/card1" in out
    drain = launched("drain", "node-b", "--reason", "maintenance", "--run", str(run_dir))
    out, err = drain.proc.communicate(timeout=60)
    assert drain.proc.returncode == 0 and "draining node node-b" in out, err
    deadline = time.monotonic() + 90
    while "evicted node-b/card1" not in (out := status()) and time.monotonic() < deadline:
        time.sleep(1)
    assert "evicted node-b/card0: drained by request: maintenance" in out
    assert "generation 2" in out and "steps trained again 0" in out
    assert not [line for line in out.splitlines() if line.strip().startswith("rank") and "node-b" in line]

    # Maintenance over: the operator gives node-b back and it joins at the next checkpoint.
    readmit = launched("readmit", "node-b", "--reason", "maintenance done", "--run", str(run_dir))
    out, err = readmit.proc.communicate(timeout=60)
    assert readmit.proc.returncode == 0 and "readmitted node-b/card0" in out and "joins at the next" in out, err
    deadline = time.monotonic() + 90
    while "rank 3: node-b/card1" not in (out := status()) and time.monotonic() < deadline:
        time.sleep(1)
    assert "generation 3" in out and "rank 3: node-b/card1" in out and "evicted node-b" not in out, out
    result.proc.send_signal(signal.SIGINT)
    result.proc.communicate(timeout=60)
    assert result.proc.returncode == 130
