"""The coordinator survives its own crash: `hyrun coordinator` on a real etcd (started here on
loopback), two `hyrun agent`s and `hyrun launch --coordinator`, all separate processes. The
coordinator is SIGKILLed mid-training; a restarted one (or a standby that wins the election) reads
the job back from etcd, the agents and the launcher reconnect, the workers train on through the gap,
and the job ends with the loss of an uninterrupted run and no extra generation."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

from conftest import free_port, job_dict, needs_etcd
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

pytestmark = needs_etcd
STEPS = 40


def _job() -> dict:
    # A checkpoint every 10 steps: a restart must not need one, but the job keeps its usual shape.
    return job_dict(training={"steps": STEPS}, checkpoint={"interval_steps": 10})


def _coordinator(launched, tmp_path, etcd, port: int, *extra: str):
    return launched(
        "coordinator", "--port", str(port), "--metrics-port", "0", "--store", etcd.url,
        "--run-root", str(tmp_path / "runs"), "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2.0", *extra,
    )  # fmt: skip


def _wait_listening(process, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.proc.stdout.readline()
        if match := re.search(r"coordinator on (\S+:\d+)", line):
            return match.group(1)
        assert process.proc.poll() is None, process.proc.stderr.read()[-3000:]
    raise AssertionError("the coordinator never said where it listens")


def _stored_job(etcd) -> dict | None:
    from hyrun.runtime.coordinator.etcd_store import EtcdStore

    store = EtcdStore("127.0.0.1", etcd.client_port)
    try:
        jobs = {k: v for k, v in store.list("jobs/").items() if k.count("/") == 1}
    finally:
        store.close()
    return next(iter(jobs.values()), None)


def _wait_step(etcd, at_least: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = _stored_job(etcd)
        if doc is not None and doc["step"] >= at_least:
            return doc
        time.sleep(0.2)
    raise AssertionError(f"the stored job never reached step {at_least}: {doc and doc['step']}")


def _start_job(write_job, launched, tmp_path, endpoints: str):
    for node in ("node-a", "node-b"):
        launched(
            "agent", "--coordinator", endpoints, "--node", node, "--simulate", "cpu-sim:2",
            "--host", "127.0.0.1", "--heartbeat-interval", "0.2", "--reconnect-timeout", "90",
        )  # fmt: skip
    return launched("launch", str(write_job(_job())), "--coordinator", endpoints, "--no-progress")


def _finish(client, tmp_path) -> dict:
    _, stderr = client.proc.communicate(timeout=240)
    assert client.proc.returncode == 0, stderr[-4000:]
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    return json.loads(summary.read_text())


def _sigkill(process) -> None:
    os.killpg(process.proc.pid, signal.SIGKILL)
    process.proc.wait(timeout=10)


def _assert_uninterrupted_result(summary: dict) -> None:
    assert summary["generations"] == 1, summary  # the restart started no generation
    assert summary["evictions"] == [] and summary["incidents"] == []
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(_job()), RankWork(), reference)
    final = reference.history[-1]
    assert final.step == STEPS
    assert summary["losses"][str(STEPS)] == pytest.approx(final.loss, rel=1e-4)


@pytest.mark.timeout(300)
def test_a_coordinator_killed_mid_training_and_restarted_carries_the_job_on(write_job, launched, tmp_path, own_etcd):
    port = free_port()
    first = _coordinator(launched, tmp_path, own_etcd, port)
    address = _wait_listening(first)
    client = _start_job(write_job, launched, tmp_path, address)
    before = _wait_step(own_etcd, 3)
    _sigkill(first)
    # The same address, the same etcd: it waits out the dead leader's lease, then reads the job back.
    second = _coordinator(launched, tmp_path, own_etcd, port)
    _wait_listening(second)
    summary = _finish(client, tmp_path)
    _assert_uninterrupted_result(summary)
    assert before["step"] < STEPS and before["generation"]["number"] == 1


@pytest.mark.timeout(300)
def test_a_standby_takes_over_from_a_killed_leader(write_job, launched, tmp_path, own_etcd):
    ports = free_port(), free_port()
    leader = _coordinator(launched, tmp_path, own_etcd, ports[0])
    _wait_listening(leader)
    standby = _coordinator(launched, tmp_path, own_etcd, ports[1], "--standby")
    endpoints = ",".join(f"127.0.0.1:{p}" for p in ports)
    client = _start_job(write_job, launched, tmp_path, endpoints)
    _wait_step(own_etcd, 3)
    killed_s = time.monotonic()
    _sigkill(leader)
    _wait_listening(standby)
    took_over_s = time.monotonic() - killed_s
    summary = _finish(client, tmp_path)
    _assert_uninterrupted_result(summary)
    assert took_over_s < 30, took_over_s


@pytest.mark.timeout(300)
def test_training_carries_on_while_etcd_restarts_and_the_store_catches_up(write_job, launched, tmp_path, own_etcd):
    first = _coordinator(launched, tmp_path, own_etcd, free_port())
    address = _wait_listening(first)
    client = _start_job(write_job, launched, tmp_path, address)
    _wait_step(own_etcd, 3)
    own_etcd.kill()
    time.sleep(2.0)  # etcd is down for a while: the coordinator must not stall or stop
    own_etcd.start()
    summary = _finish(client, tmp_path)
    _assert_uninterrupted_result(summary)
    stored = _stored_job(own_etcd)
    assert stored["state"] == "COMPLETED" and stored["step"] == STEPS
