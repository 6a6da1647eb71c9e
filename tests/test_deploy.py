"""deploy/ stays true to the code: Prometheus' own tools accept the scrape config and alert rules and
pass the rules' unit tests, every metric the dashboard and the rules query is one the coordinator
exports, and the Slurm and Kubernetes examples use only options the `hyrun` CLI has."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main
import yaml

from hyrun.runtime.cli import app
from hyrun.runtime.jobfile import load_job
from hyrun.runtime.metrics import CoordinatorMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)"
)

# Series Prometheus makes itself for every target; alerts.yml uses `up` to see a dead coordinator.
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
             "gaugehistogram": ("_bucket", "_gcount", "_gsum")}  # fmt: skip
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "bool", "atan2", "inf", "nan"}  # fmt: skip


def exported_metric_names() -> set[str]:
    """The series names the coordinator's registry exposes, from each family's type (a labelled
    family has no samples until a label is used, so samples alone would miss it)."""
    names = set()
    for family in CoordinatorMetrics().registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left once strings, label matchers,
    ranges, grouping label lists, function calls, keywords and numbers are set aside."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:$])[A-Za-z_:][\w:]*", text):
        if re.match(r"\s*\(", text[match.end():]) or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_the_promql_name_finder_finds_names_and_only_names():
    expr = ('sum by (job, instance) (rate(hyrun_heartbeats_total{instance=~"$instance", x="a b"}[$__rate_interval]))'
            ' / on (job) group_left hyrun:recorded offset 5m > bool 0.7 * max_over_time(hyrun_step[1h:30s])'
            ' unless up == 1e3')  # fmt: skip
    assert promql_metric_names(expr) == {"hyrun_heartbeats_total", "hyrun:recorded", "hyrun_step", "up"}


# ------------------------------------------------------------------------------------- prometheus


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_accepts_the_scrape_config():
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.timeout(60)
def test_promtool_accepts_the_rules():
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.timeout(60)
def test_the_rules_pass_their_unit_tests():
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_rule_queries_only_metrics_the_coordinator_exports():
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    known = exported_metric_names() | recorded | PROMETHEUS_OWN
    for rule in rules:
        names = promql_metric_names(rule["expr"])
        assert names, f"{rule.get('alert') or rule.get('record')}: no metric found in {rule['expr']!r}"
        assert names <= known, f"{rule.get('alert') or rule.get('record')}: unknown {sorted(names - known)}"


def test_every_alert_has_a_promtool_case():
    cases = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    tested = {check["alertname"] for case in cases for check in case.get("alert_rule_test", []) if check["exp_alerts"]}
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts <= tested, f"no promtool case in which {sorted(alerts - tested)} fires"


def test_the_rules_cover_lost_nodes_stalls_failures_and_throughput():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert {"HyrunNodeLost", "HyrunNoStepProgress", "HyrunJobFailed", "HyrunThroughputDrop", "HyrunCardNearSlowdown",
            "HyrunFatalXid", "HyrunEccErrors", "HyrunRankOverflow", "HyrunCheckpointStale", "HyrunRecoverySlow",
            "HyrunCoordinatorLoopLag"} <= set(alerts)  # fmt: skip
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


# ---------------------------------------------------------------------------------------- grafana


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "hyrun-dashboard.json").read_text())


def _panels(panels: list[dict]) -> list[dict]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))  # panels inside collapsed rows
    return found


def test_the_dashboard_queries_only_metrics_the_coordinator_exports():
    dashboard = _dashboard()
    known = exported_metric_names()
    exprs = []
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        exprs += [(panel["title"], target["expr"]) for target in targets]
    exprs += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            exprs.append((variable["name"], re.sub(r"^label_values\(\s*(.+),\s*\w+\s*\)$", r"\1", query)))
    used = set()
    for where, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= known, f"{where}: unknown {sorted(names - known)} in {expr!r}"
        used |= names
    wanted = {"hyrun_nodes_alive", "hyrun_cards", "hyrun_generation", "hyrun_step", "hyrun_loss",
              "hyrun_tokens_per_second", "hyrun_rank_step_time_seconds", "hyrun_worker_exits_total",
              "hyrun_heartbeats_total"}  # fmt: skip
    assert wanted <= used, f"no panel for {sorted(wanted - used)}"


def test_the_dashboard_imports_anywhere():
    """One Prometheus picked by a datasource variable, not a data source uid from our Grafana."""
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


# -------------------------------------------------------------------------------- slurm, kubernetes


def _cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}
        for name, command in group.commands.items()
    }


def _check_hyrun_command(tokens: list[str], where: str, options: dict[str, set[str]]) -> str:
    assert tokens[0] == "hyrun" and tokens[1] in options, f"{where}: {' '.join(tokens[:2])}"
    flags = {token.split("=", 1)[0] for token in tokens[2:] if token.startswith("--")}
    assert flags <= options[tokens[1]], f"{where}: hyrun {tokens[1]} has no {sorted(flags - options[tokens[1]])}"
    return tokens[1]


def test_the_kubernetes_example_uses_only_real_cli_options_and_a_valid_job(tmp_path):
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "hyrun.yaml").read_text()) if d]
    options = _cli_options()
    commands = set()
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), document
        spec = document.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            tokens = [*container.get("command", []), *container.get("args", [])]
            commands.add(_check_hyrun_command(tokens, f"{document['kind']}/{container['name']}", options))
        if document["kind"] == "ConfigMap" and "job.yaml" in document.get("data", {}):
            job_file = tmp_path / "job.yaml"
            job_file.write_text(document["data"]["job.yaml"])
            load_job(job_file)  # raises with the field and value if the example job is not valid
    assert commands == {"coordinator", "agent", "launch"}


def test_the_slurm_example_parses_and_uses_only_real_cli_options():
    path = DEPLOY / "slurm" / "hyrun.sbatch"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    script = re.sub(r"\\\n", " ", path.read_text())  # join continued lines
    options = _cli_options()
    commands = set()
    for line in script.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"(?:^|[\s'\"])(hyrun\s+[a-z]+[^&|;'\n]*)", line):
            tokens = shlex.split(match.group(1).replace('"', ""))
            commands.add(_check_hyrun_command(tokens, f"hyrun.sbatch: {match.group(1).strip()}", options))
    assert commands == {"coordinator", "agent", "launch"}


# ------------------------------------------------------------------------------- grafana's model

# Keys Grafana keeps outside its typed dashboard model: the Prometheus data source's own annotation
# fields (read by the plugin, stored as they are), a built-in annotation's marker, and a query
# variable's editor text. Everything else must be a field of the model.
_PLUGIN_KEYS = {"builtIn", "step", "titleFormat", "textFormat", "useValueForTime", "definition"}


def _lost_or_changed(ours, theirs, path: str = "") -> list[str]:
    """Where Grafana's model dropped or altered what we wrote (defaults it adds are fine)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        problems = []
        for key, value in ours.items():
            if key not in theirs:
                if key not in _PLUGIN_KEYS:
                    problems.append(f"{path}.{key} dropped")
            else:
                problems += _lost_or_changed(value, theirs[key], f"{path}.{key}")
        return problems
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [p for i, (a, b) in enumerate(zip(ours, theirs)) for p in _lost_or_changed(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} became {theirs!r}"]


def test_the_dashboard_survives_grafanas_json_model_unchanged():
    """Grafana's own dashboard model (grafana-foundation-sdk, generated from Grafana's schema) reads the
    JSON and writes it back: nothing we wrote may be dropped or changed."""
    sdk = pytest.importorskip("grafana_foundation_sdk", reason="pip install -e '.[dev]' (grafana-foundation-sdk)")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    del sdk
    ours = _dashboard()
    theirs = json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(ours)))
    assert _lost_or_changed(ours, theirs) == []


def test_the_dashboard_json_is_what_its_script_writes():
    import runpy

    script = runpy.run_path(str(DEPLOY / "grafana" / "dashboard.py"))
    assert (DEPLOY / "grafana" / "hyrun-dashboard.json").read_text() == script["render"](), (
        "run python deploy/grafana/dashboard.py"
    )


def test_the_dashboard_has_the_monitoring_panels_and_variables():
    dashboard = _dashboard()
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job", "instance", "node"}
    exprs = " ".join(t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", []))
    for family in ("hyrun_card_temperature_celsius", "hyrun_card_slowdown_temperature_celsius",
                   "hyrun_card_xid_events_total", "hyrun_card_ecc_uncorrected_errors_total", "hyrun_card_throttle_reasons",
                   "hyrun_rank_nonfinite_grad_steps_total", "hyrun_rank_grad_norm", "hyrun_rank_time_seconds",
                   "hyrun_checkpoint_stall_seconds", "hyrun_checkpoint_durable_seconds", "hyrun_checkpoint_age_seconds",
                   "hyrun_recovery_resume_seconds", "hyrun_planner_predicted_step_time_seconds", "hyrun_loss",
                   "hyrun_tokens_per_second", "hyrun_coordinator_loop_lag_seconds", "hyrun_eval_loss",
                   "hyrun_eval_checkpoint_step", "hyrun_eval_failures_total"):  # fmt: skip
        assert family in exprs, f"no panel shows {family}"
    assert any(p["type"] == "heatmap" for p in dashboard["panels"]), "no overflow heat map"
    annotations = " ".join(a.get("expr", "") for a in dashboard["annotations"]["list"])
    assert "hyrun_evictions_total" in annotations and "hyrun_generation" in annotations
