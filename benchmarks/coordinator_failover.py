"""Coordinator failover: how long a job goes without a coordinator when its leader is SIGKILLed.

Each repetition runs a 4-card CPU job (2 agents x 2 simulated cards, separate processes) against
`hyrun coordinator --store etcd://...` on a real etcd started here on loopback, kills the leading
coordinator at a fixed step, and measures from the kill:

  * listening: until a coordinator that read the job back from etcd listens again;
  * accepting: until that coordinator completes a training step from the agents' reports (its
    `hyrun_step` gauge moves): the job is coordinated again.

Two ways back, in the same run: a standby (`--standby`, already started and waiting on the election)
against the baseline of starting a coordinator again on the same address once the old one is dead
(what systemd or Kubernetes would do). Both wait out the dead leader's lease (--lease-ttl, 5 s);
the standby skips the process start. Every run must end with one generation (the workers trained on
through the gap) and the job's final loss.

    python benchmarks/coordinator_failover.py [--repeats 3] [--steps 60] [--kill-at 5]

Needs the etcd binary (apt-get install etcd-server).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from hyrun.common.process import kill_group
from hyrun.runtime.local_etcd import LocalEtcd, free_port

ENV = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")


class Processes:
    """Every process started here, each in its own session; `close` kills them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], stdout=subprocess.DEVNULL) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=stdout, stderr=log, start_new_session=True, env=ENV, text=stdout is not subprocess.DEVNULL)
        self.started.append(proc)
        return proc

    def hyrun(self, name: str, *args: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "hyrun.runtime.cli", *args], stdout=stdout)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for proc in self.started:
            self.kill(proc)


def wait_listening(proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """Reads the coordinator's stdout until it says where it listens; returns its metrics port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if match := re.search(r"coordinator on \S+:\d+, metrics on :(\d+)", line):
            return int(match.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"a coordinator exited with {proc.returncode}")
    raise SystemExit("a coordinator never said where it listens")


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return float("nan")
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def stored_step(store) -> int:
    """The step of the job stored in etcd (0 while there is none, or while etcd is slow to answer)."""
    from hyrun.runtime.coordinator.etcd_store import EtcdUnavailable

    try:
        docs = [v for k, v in store.list("jobs/").items() if k.count("/") == 1]
    except EtcdUnavailable:
        return 0
    return docs[0]["step"] if docs else 0


def one_failover(mode: str, args, tmp: Path) -> dict:
    from hyrun.runtime.coordinator.etcd_store import EtcdStore

    procs = Processes(tmp)
    store, server = None, LocalEtcd(tmp / "etcd", name="bench")
    try:
        server.start()
        etcd = server.url
        store = EtcdStore("127.0.0.1", server.client_port, timeout_s=10.0)  # a loaded box answers slowly
        ports = [free_port(), free_port()]

        def coordinator(name: str, port: int, *extra: str) -> subprocess.Popen:
            return procs.hyrun(name, "coordinator", "--port", str(port), "--metrics-port", "0", "--store", etcd,
                               "--run-root", str(tmp / "runs"), "--heartbeat-interval", "0.2",
                               "--heartbeat-timeout", "2.0", *extra, stdout=subprocess.PIPE)  # fmt: skip

        leader = coordinator("leader", ports[0])
        wait_listening(leader)
        standby = coordinator("standby", ports[1], "--standby") if mode == "standby" else None
        endpoints = f"127.0.0.1:{ports[0]}" + (f",127.0.0.1:{ports[1]}" if standby else "")
        for node in ("node-a", "node-b"):
            procs.hyrun(node, "agent", "--coordinator", endpoints, "--node", node, "--simulate", "cpu-sim:2",
                        "--host", "127.0.0.1", "--heartbeat-interval", "0.2", "--reconnect-timeout", "120")  # fmt: skip
        job = {
            "name": "failover-bench",
            "cluster": {"nodes": [{"name": n, "cards": [{"type": "cpu-sim", "count": 2}]} for n in ("node-a", "node-b")]},
            "model": {"preset": "tiny"},
            "parallelism": {"tp": 1, "pp": 1, "cp": 1, "ep": 1},
            "training": {"steps": args.steps, "global_batch": 8, "micro_batch": 2, "seq_len": 32},
            "checkpoint": {"interval_steps": 20},
            "runtime": {"run_dir": str(tmp / "runs")},
            # Four workers share two loaded cores: per-card speed is noisy, and a straggler replan
            # would be a second generation that has nothing to do with the failover measured here.
            "health": {"straggler_ratio": 50.0, "straggler_drain_ratio": 60.0},
        }
        (tmp / "job.yaml").write_text(yaml.safe_dump(job))
        launch = procs.hyrun("launch", "launch", str(tmp / "job.yaml"), "--coordinator", endpoints, "--no-progress")
        deadline = time.monotonic() + 180
        while stored_step(store) < args.kill_at:
            if time.monotonic() > deadline or launch.poll() is not None:
                raise SystemExit(f"{mode}: the job never reached step {args.kill_at} (see {tmp})")
            time.sleep(0.1)
        killed_step = stored_step(store)
        killed_s = time.monotonic()
        procs.kill(leader)
        if standby is None:
            standby = coordinator("restarted", ports[0])
        metrics_port = wait_listening(standby)
        listening_s = time.monotonic() - killed_s
        while not metric(metrics_port, "hyrun_step") > 0:
            if time.monotonic() - killed_s > 120:
                raise SystemExit(f"{mode}: the new leader completed no step within 120 s (see {tmp})")
            time.sleep(0.02)
        accepting_s = time.monotonic() - killed_s
        launch.wait(timeout=300)
        (summary_path,) = (tmp / "runs").glob("*/summary.json")
        summary = json.loads(summary_path.read_text())
        if launch.returncode != 0 or summary["generations"] != 1:
            raise SystemExit(f"{mode}: the job did not carry on in one generation: {summary.get('message')} (see {tmp})")
        return {"listening_s": listening_s, "accepting_s": accepting_s, "killed_at": killed_step,
                "final_loss": summary["losses"][str(args.steps)]}  # fmt: skip
    finally:
        if store is not None:
            store.close()
        procs.close()
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="failovers per mode (default 3)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per job (default 60)")
    parser.add_argument("--kill-at", type=int, default=5, help="kill the leader once the stored step reaches this")
    args = parser.parse_args()
    if shutil.which("etcd") is None:
        raise SystemExit("needs the etcd binary (apt-get install etcd-server)")
    results: dict[str, list[dict]] = {"restart": [], "standby": []}
    for repeat in range(args.repeats):
        for mode in results:
            tmp = Path(tempfile.mkdtemp(prefix=f"hyrun-failover-{mode}-"))
            result = one_failover(mode, args, tmp)
            results[mode].append(result)
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"repeat {repeat + 1} {mode:8s} killed at step {result['killed_at']:3d}: listening after "
                  f"{result['listening_s']:5.2f} s, a step completed after {result['accepting_s']:5.2f} s, "
                  f"final loss {result['final_loss']:.6f}", flush=True)  # fmt: skip
    losses = {round(r["final_loss"], 5) for rs in results.values() for r in rs}
    median = {mode: {k: statistics.median(r[k] for r in rs) for k in ("listening_s", "accepting_s")} for mode, rs in results.items()}
    for mode, m in median.items():
        print(f"median {mode:8s}: listening {m['listening_s']:.2f} s, kill -> leader accepting reports {m['accepting_s']:.2f} s")
    print(f"final losses equal across all runs: {len(losses) == 1}; one generation each: True")
    ratio = median["restart"]["accepting_s"] / median["standby"]["accepting_s"]
    print(f"standby takeover vs restarting a coordinator: kill -> accepting reports {median['standby']['accepting_s']:.2f} s "
          f"vs {median['restart']['accepting_s']:.2f} s ({ratio:.2f}x faster)")


if __name__ == "__main__":
    main()
