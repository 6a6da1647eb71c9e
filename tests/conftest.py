"""Shared fixtures: small job files and launched `hyrun` processes that never outlive their test."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from hyrun.runtime.local_etcd import LocalEtcd, etcd_binary, free_port  # noqa: F401 - free_port for tests

REPO = Path(__file__).resolve().parent.parent

TINY_JOB = {
    "name": "t",
    "cluster": {
        "nodes": [
            {"name": "node-a", "cards": [{"type": "cpu-sim", "count": 2}]},
            {"name": "node-b", "cards": [{"type": "cpu-sim", "count": 2}]},
        ]
    },
    "model": {"preset": "tiny"},
    # Plain data parallelism (dp left to the planner): the fault tests are about faults; the 5D
    # layouts have their own launches in test_parallel_launch.py.
    "parallelism": {"tp": 1, "pp": 1, "cp": 1, "ep": 1},
    "training": {"steps": 4, "global_batch": 8, "micro_batch": 2, "seq_len": 16, "schedule": {"warmup_steps": 1}},
    "runtime": {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0},
    # Four workers share two loaded cores here, so per-card speed is noisy: only the straggler
    # tests ask for straggler verdicts.
    "health": {"straggler_ratio": 50.0, "straggler_drain_ratio": 60.0},
}


class FakeRendezvous:
    """Stands in for a generation's TCPStore where no worker will dial it (coordinator unit tests)."""

    def __init__(self, bind_host: str, advertise_host: str, job_id: str, generation: int, world_size: int):
        from types import SimpleNamespace

        self.info = SimpleNamespace(host=advertise_host, port=40000 + generation, key_prefix=f"{job_id}/{generation}/",
                                    world_size=world_size)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def job_dict(**sections) -> dict:
    job = copy.deepcopy(TINY_JOB)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key].update(value)
        else:
            job[key] = value
    return job


@pytest.fixture
def write_job(tmp_path):
    def write(job: dict, name: str = "job.yaml") -> Path:
        job = copy.deepcopy(job)
        job.setdefault("runtime", {})["run_dir"] = str(tmp_path / "runs")
        path = tmp_path / name
        path.write_text(yaml.safe_dump(job))
        return path

    return write


class Launched:
    """A `hyrun` CLI process in its own session; every process it starts is tracked."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hyrun.runtime.cli", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
        )
        self.seen: set[int] = {self.proc.pid}

    def descendants(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(child.pid for child in children)
        return children

    def alive_seen(self) -> list[int]:
        alive = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_everything(self) -> None:
        for pid in self.alive_seen():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def launched(tmp_path):
    started: list[Launched] = []

    def start(*args: str) -> Launched:
        process = Launched(list(args), tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill_everything()


@pytest.fixture
def netns_hosts():
    """A factory of `NetnsHosts` (each node its own network namespace on two bridges); every one it
    made is removed at teardown, whatever the test did. Skips, saying why, without root or iproute2."""
    from hyrun.runtime.network.hosts import NetnsHosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made: list[NetnsHosts] = []

    def make(nodes: list[str]) -> NetnsHosts:
        made.append(NetnsHosts(nodes))
        return made[-1]

    yield make
    for hosts in made:
        hosts.close()


# ------------------------------------------------------------------------------------- etcd

ETCD = etcd_binary()
needs_etcd = pytest.mark.skipif(ETCD is None, reason="the etcd binary is not installed (apt-get install etcd-server)")


class EtcdServer(LocalEtcd):
    """hyrun's LocalEtcd, failing the test (with etcd's log) instead of raising."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, name="test")

    def start(self, timeout_s: float = 15.0) -> None:
        try:
            super().start(timeout_s)
        except RuntimeError as error:
            pytest.fail(str(error))


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd for one test alone, for tests that kill it."""
    if ETCD is None:
        pytest.skip("the etcd binary is not installed (apt-get install etcd-server)")
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    yield server
    server.kill()
