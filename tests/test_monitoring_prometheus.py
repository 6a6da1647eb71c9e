"""The monitoring stack against a real Prometheus (Debian's `prometheus`, started here on loopback):
a 4-card job with scripted faults (a kill, a fatal XID with ECC errors, NaN gradients on one rank
while its card heats up, evaluations reported as the process beside training sends them, one worse
than the checkpoint before) is scraped every second with deploy/prometheus/alerts.yml loaded; every
dashboard panel, annotation and variable query and every rule's expression must return data, and
the alerts for those faults must fire. The same job without faults fires no alert."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import job_dict

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")

FAULTS = [  # one per generation, each on a card the next plan still uses (the planner spreads 12 micro-batches)
    {"kind": "kill", "node": "node-b", "card": 1, "at_step": 3, "generation": 1},
    {"kind": "xid", "node": "node-b", "card": 0, "at_step": 2, "xid": 79, "generation": 2},
    {"kind": "ecc", "node": "node-b", "card": 0, "at_step": 2, "generation": 2},
    {"kind": "nan_grad", "node": "node-a", "card": 1, "at_step": 2, "repeat_steps": 3, "generation": 3},
    # Hot past slowdown within 0.2 s of its step, however soon the overflow ends generation 3: a
    # simulated card then cools slowly, so its throttle shows for several scrapes.
    {"kind": "temperature_ramp", "node": "node-a", "card": 1, "at_step": 2, "c_per_s": 400.0, "generation": 3},
]  # fmt: skip
EXPECTED_ALERTS = {"HyrunCardsEvicted", "HyrunFatalXid", "HyrunEccErrors", "HyrunRankOverflow", "HyrunCardNearSlowdown",
                   "HyrunEvalWorse"}
# What an evaluation beside training reports (this job has no corpus to score): a checkpoint, a failed
# evaluation, then a newer checkpoint whose held-out loss on one source is 10% worse (HyrunEvalWorse).
EVALUATIONS = [
    {"step": 2, "duration_s": 1.0, "sources": {"email": {"loss": 3.0, "perplexity": 20.1, "tokens": 64},
                                               "json": {"loss": 2.0, "perplexity": 7.4, "tokens": 64}}},
    {"step": 3, "duration_s": 0.2, "error": "RuntimeError: injected"},
    {"step": 4, "duration_s": 1.0, "sources": {"email": {"loss": 3.3, "perplexity": 27.1, "tokens": 64},
                                               "json": {"loss": 1.9, "perplexity": 6.7, "tokens": 64}}},
]


def _job(faults: list[dict], steps: int) -> dict:
    # Drains checkpoint on demand; no checkpoint by interval, so each fault's generation starts where
    # test_recovery's do (the faults' steps are the steps of their own generation).
    # 12 micro-batches of one sequence split evenly over 4, 3, 2 or 1 cards, so every plan uses every card left.
    training = {"steps": steps, "global_batch": 12, "micro_batch": 1, "seq_len": 16, "schedule": {"warmup_steps": 1}}
    return job_dict(training=training, checkpoint={"interval_steps": 50}, faults=faults,
                    health={"overflow_strikes": 2, "straggler_ratio": 50.0, "straggler_drain_ratio": 60.0})


# ------------------------------------------------------------------------------------- prometheus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """A Prometheus on 127.0.0.1 scraping one coordinator every second, with hyrun's rules loaded."""

    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": "hyrun-coordinator", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        for _attempt in range(3):  # a port picked free can be taken before Prometheus binds it
            self.port = _free_port()
            self.log = open(workdir / f"prometheus-{self.port}.log", "w")
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            if self._ready(timeout_s=30):
                return
            self.stop()
        raise RuntimeError(f"prometheus did not start; see {workdir}")

    def _ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=20) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def firing(self) -> dict[str, str]:
        """Alert name -> state (pending or firing) of every active alert."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def coordinator_down(self) -> bool:
        """The last scrape of the coordinator failed (up == 0)."""
        return any(r["value"][1] == "0" for r in self.api("query", query='up{job="hyrun-coordinator"}')["result"])

    def samples(self, expr: str, start_s: float, end_s: float) -> int:
        """Samples of `expr` over [start, end] at 1 s steps (a range query: series that came and went count)."""
        data = self.api("query_range", query=expr, start=f"{start_s:.3f}", end=f"{end_s:.3f}", step="1")
        return sum(len(series["values"]) for series in data["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def start_prometheus(tmp_path):
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path / f"prometheus-{len(started)}", target))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


# ----------------------------------------------------------------------------------------- queries


def with_bool(expr: str) -> str:
    """`expr` with every comparison made a `bool` one: the rule's measured series (0/1) instead of
    only the ones past its threshold, so 'returns data' checks the rule's inputs and joins, not the
    faults. Strings, label matchers and ranges are left alone."""
    out, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'":
            end = expr.index(c, i + 1)
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        if c in "{[":
            end = expr.index("}" if c == "{" else "]", i)
            out.append(expr[i : end + 1])
            i = end + 1
            continue
        match = re.match(r"==|!=|>=|<=|>|<", expr[i:])
        if match:
            out.append(match.group())
            i += len(match.group())
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        out.append(c)
        i += 1
    return "".join(out)


def test_with_bool_makes_comparisons_bool_and_leaves_matchers_alone():
    expr = 'a{x!="1",y=~"b"} > 5 and on (i) c[1m] >= bool 2 or d == e'
    assert with_bool(expr) == 'a{x!="1",y=~"b"} > bool 5 and on (i) c[1m] >= bool 2 or d == bool e'


def _dashboard_queries(duration_s: float) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and variable, with Grafana's variables
    filled in as the dashboard's defaults ("All") and a 1 s scrape would make them."""
    dashboard = json.loads((DEPLOY / "grafana" / "hyrun-dashboard.json").read_text())
    fill = {"$job": ".*", "$instance": ".*", "$node": ".*", "$__rate_interval": "5s", "$__interval": "1s",
            "$__range": f"{max(5, math.ceil(duration_s))}s"}  # fmt: skip

    def filled(expr: str) -> str:
        for name, value in sorted(fill.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(name, value)
        assert "$" not in expr, expr
        return expr

    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", filled(target["expr"])))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", filled(annotation["expr"])))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.sub(r"^label_values\(\s*(.+),\s*\w+\s*\)$", r"\1", variable["query"]["query"])
            queries.append((f"variable {variable['name']!r}", filled(selector)))
    return queries


def _rule_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return [(f"alert {r['alert']}", with_bool(r["expr"])) if "alert" in r else (f"record {r['record']}", r["record"])
            for r in rules]  # fmt: skip


# ------------------------------------------------------------------------------------------- runs


def _run(job: dict, write_job, launched, tmp_path, start_prometheus, timeout_s: float, evaluations=()):
    """Launches the job, scrapes it, polls the alerts every second until the launcher exits; sends
    `evaluations` to the coordinator as the evaluation beside training would, one per poll.
    Returns (prometheus, start_s, end_s, alert name -> states seen while the job ran)."""
    from hyrun.runtime.eval.report import CoordinatorTarget, send_report

    result = launched("launch", str(write_job(job)), "--no-progress")
    deadline = time.monotonic() + 60
    info = None
    while info is None and time.monotonic() < deadline:
        found = list((tmp_path / "runs").glob("*/coordinator.json"))
        info = json.loads(found[0].read_text()) if found else None
        assert result.proc.poll() is None or info is not None, result.proc.communicate()[1]
        time.sleep(0.1)
    assert info is not None, "the launcher never wrote coordinator.json"
    prometheus = start_prometheus(f"127.0.0.1:{info['metrics_port']}")
    start_s, seen, unsent = time.time(), {}, list(evaluations)
    run_dir = found[0].parent
    target = CoordinatorTarget(info["address"], run_dir.name, (run_dir / "token").read_text())
    deadline = time.monotonic() + timeout_s
    while result.proc.poll() is None:
        assert time.monotonic() < deadline, "the job did not end in time"
        if prometheus.coordinator_down():
            break  # the job ended and the launcher stopped its coordinator: what follows is not the job's
        for name, state in prometheus.firing().items():
            seen.setdefault(name, set()).add(state)
        if unsent and send_report(target, unsent[0]) == "":  # NOT_FOUND until the job is submitted
            unsent.pop(0)
        time.sleep(1.0)
    _, stderr = result.proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert result.proc.returncode == 0, stderr[-3000:]
    assert not unsent, f"evaluations never taken by the coordinator: {unsent}"
    return prometheus, start_s, time.time(), seen


@pytest.mark.timeout(420)
def test_a_faulty_job_fills_every_panel_and_rule_and_fires_the_fault_alerts(
    write_job, launched, tmp_path, start_prometheus
):
    # Heartbeats through a relay here (the fault-free run below sends them straight): nothing on a
    # panel or in a rule may go missing because a relay sits between the agents and the coordinator.
    job = _job(FAULTS, steps=8)
    job["runtime"] = {"relays": True}
    prometheus, start_s, end_s, seen = _run(job, write_job, launched, tmp_path, start_prometheus, timeout_s=300,
                                            evaluations=EVALUATIONS)
    agent_logs = "".join(path.read_text() for path in (tmp_path / "runs").glob("*/agent-*.log"))
    assert "heartbeats via node-" in agent_logs, "no agent sent its heartbeats through the relay"
    firing = {name for name, states in seen.items() if "firing" in states}
    assert EXPECTED_ALERTS <= firing, f"fired: {sorted(firing)}; missing {sorted(EXPECTED_ALERTS - firing)}"
    empty = [f"{where}: {expr}" for where, expr in _dashboard_queries(end_s - start_s) + _rule_queries()
             if prometheus.samples(expr, start_s, end_s) == 0]  # fmt: skip
    assert not empty, "no data:\n" + "\n".join(empty)


@pytest.mark.timeout(300)
def test_a_fault_free_job_fires_no_alert(write_job, launched, tmp_path, start_prometheus):
    prometheus, start_s, end_s, seen = _run(
        _job([], steps=4), write_job, launched, tmp_path, start_prometheus, timeout_s=200
    )
    assert seen == {}, f"alerts in a fault-free run: {seen}"
    assert prometheus.samples("hyrun_step", start_s, end_s) > 0  # it was scraped
