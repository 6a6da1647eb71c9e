"""The chaos matrix: trials drawn from a seed, the per-kind table, the report files (JSON, markdown,
HTML with plots, rendered by headless Chromium where it is installed), and real trials: a small
matrix survived and an unsurvivable scenario ending FAILED with its reason in bounded time."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hyrun.runtime.chaos import ChaosReport, ChaosRun, Scenario, draw_faults, load_scenario, match_incidents, trial_faults
from hyrun.runtime.chaos_report import markdown, per_kind, report_dict, write_report
from hyrun.runtime.jobfile import FaultSpec
from hyrun.runtime.launch import JobOutcome

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "chaos"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_trials_are_drawn_from_the_seed_one_kind_at_a_time_in_a_matrix():
    scenario, job = load_scenario(EXAMPLES / "matrix.yaml")
    scenario = scenario.model_copy(update={"repeat": 3})
    planned = trial_faults(scenario)
    assert len(planned) == 3 * len(scenario.faults) and all(len(faults) == 1 for faults in planned)
    kinds = [str(faults[0].model_dump(include={"kind", "signal", "target"})) for faults in planned]
    assert all(kinds.count(kind) == 3 for kind in set(kinds))
    first = [draw_faults(scenario, job, trial, faults)[0] for trial, faults in enumerate(planned)]
    again = [draw_faults(scenario, job, trial, faults)[0] for trial, faults in enumerate(planned)]
    other = [draw_faults(scenario.model_copy(update={"seed": 1}), job, t, f)[0] for t, f in enumerate(planned)]
    assert first == again and first != other  # repeatable, and the seed matters
    assert all(3 <= f.at_step <= 10 for f in first)
    assert len({(f.node, f.card) for f in first}) > 1  # targets drawn among the job's cards


def _outcome(state: str, losses: dict[int, float], incidents: list[dict], evictions: list[str]) -> JobOutcome:
    return JobOutcome("job", state, "" if state == "COMPLETED" else "every rank failed the same way", Path("/runs/job"),
                      10.0, losses=losses, step_done_s={s: float(s) for s in losses}, incidents=incidents,
                      evictions=evictions, generations=1 + len(incidents))  # fmt: skip


def _run() -> ChaosRun:
    kill = FaultSpec(kind="kill", node="node-b", card=1, at_step=4)
    xid = FaultSpec(kind="xid", node="node-a", card=0, at_step=5)
    incident = {"cards": ["node-b/card1"], "generation": 1, "verdict": "evict", "reason": "killed by SIGKILL",
                "detected_at_s": 4.5, "last_step_before_s": 4.0, "resumed_at_s": 6.0, "steps_lost": 2, "step_at_failure": 4}
    survived = _outcome("COMPLETED", {s: 5.0 - 0.1 * s for s in range(1, 9)}, [incident], ["node-b/card1: killed"])
    missed = _outcome("FAILED", {1: 4.9}, [], [])
    reference = _outcome("COMPLETED", {s: 5.0 - 0.1 * s for s in range(1, 9)}, [], [])
    trials = [ChaosReport(survived, match_incidents([kill], survived.incidents), 4.2, 4.2),
              ChaosReport(missed, match_incidents([xid], missed.incidents), 4.2, 4.9)]
    return ChaosRun(Scenario(job="job.yaml", faults=[kill, xid], each=True), trials, reference)


def test_per_kind_survival_and_times_and_the_report_files(tmp_path):
    run = _run()
    kinds = per_kind(run)
    assert kinds["kill"]["survived"] == 1 and kinds["kill"]["detect_p50_s"] == pytest.approx(0.5)
    assert kinds["kill"]["recover_p50_s"] == pytest.approx(1.5) and kinds["kill"]["max_steps_lost"] == 2
    assert kinds["xid"] == dict(kinds["xid"], trials=1, survived=0, detect_p50_s=None)
    assert not run.passed
    report = write_report(run, tmp_path, total_cards=4)
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["trials"][0]["cards_left"] == 3 and report["trials"][1]["state"] == "FAILED"
    text = (tmp_path / "report.md").read_text()
    assert "| kill | 1/1 |" in text and "| xid | 0/1 |" in text and "every rank failed the same way" in text
    page = (tmp_path / "report.html").read_text()
    assert "<table>" in page and "<svg" in page and "loss vs the fault-free run" in page
    assert markdown(report_dict(run, 4)) == text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.timeout(120)
def test_the_html_report_renders_in_headless_chromium_with_its_plots(tmp_path):
    write_report(_run(), tmp_path, total_cards=4)
    page = f"file://{tmp_path / 'report.html'}"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=90)
    assert "<svg" in dom.stdout and "<td>kill</td>" in dom.stdout  # the tables rendered as tables, the plots there
    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", page], capture_output=True, timeout=90)
    assert shot.stat().st_size > 20_000  # a page with plots, not a blank one


@pytest.mark.timeout(900)
def test_a_small_matrix_is_survived_and_an_unsurvivable_scenario_fails_saying_why(launched, tmp_path):
    small = tmp_path / "small.yaml"  # two kinds of the matrix, one trial each, no reference run
    small.write_text(f"""
job: {EXAMPLES / 'job.yaml'}
each: true
compare: false
randomize: {{at_step: [3, 10], target: true}}
trial_timeout_s: 300
faults:
  - {{kind: kill, node: node-a, card: 0, at_step: 5}}
  - {{kind: xid, node: node-a, card: 0, at_step: 5, xid: 79}}
""")
    result = launched("chaos", "run", str(small), "--repeat", "1", "--seed", "3", "--report", str(tmp_path / "report"))
    _, stderr = result.proc.communicate(timeout=600)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert result.proc.returncode == 0, (stderr[-3000:], report)
    assert {k: (v["survived"], v["trials"]) for k, v in report["kinds"].items()} == {"kill": (1, 1), "xid": (1, 1)}

    fail = launched("chaos", "run", str(EXAMPLES / "unsurvivable.yaml"), "--json", str(tmp_path / "fail.json"))
    _, stderr = fail.proc.communicate(timeout=240)
    (trial,) = json.loads((tmp_path / "fail.json").read_text())["trials"]
    assert fail.proc.returncode == 0 and trial["state"] == "FAILED", stderr[-3000:]
    assert "failed the same way" in trial["message"] or "no usable card" in trial["message"], trial["message"]
