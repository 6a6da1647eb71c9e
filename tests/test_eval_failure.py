"""An evaluation that fails never stops training: with the corpus's held-out shards damaged, every
checkpoint's evaluation beside training fails, each failure is in eval.jsonl and reaches the
coordinator's hyrun_eval_failures_total while the job runs, and the job completes every step."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from data_corpus import corpus, data_job  # noqa: F401  (corpus is a fixture)

STEPS = 24


def _eval_failures(metrics_port: int) -> float:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return 0.0  # the job ended and its coordinator with it
    line = next((ln for ln in body.splitlines() if ln.startswith("hyrun_eval_failures_total ")), "x 0")
    return float(line.split()[1])


@pytest.mark.timeout(400)
def test_a_failing_evaluation_is_reported_and_training_completes(corpus, write_job, launched, tmp_path):
    damaged = tmp_path / "corpus"
    shutil.copytree(corpus, damaged)
    for held_out in damaged.glob("*/val.bin"):
        held_out.write_bytes(b"")  # a damaged held-out shard: training never reads it, every evaluation does
    job = data_job(damaged, steps=STEPS, validation={"samples_per_source": 4, "every_checkpoint": True})
    job["checkpoint"] = {"interval_steps": 2, "keep_last": STEPS}
    # One node of two slowed cards: the job outlasts the evaluation process's start (torch import)
    # on a loaded box, so failures reach the coordinator while it runs.
    job["cluster"] = {"nodes": [{"name": "node-a", "cards": [{"type": "cpu-sim", "count": 2, "speed": 0.3}]}]}
    result = launched("launch", str(write_job(job)), "--no-progress")

    failures_seen, deadline = 0.0, time.monotonic() + 350
    while result.proc.poll() is None and failures_seen < 1:
        assert time.monotonic() < deadline, "the job did not end in time"
        info = list((tmp_path / "runs").glob("*/coordinator.json"))
        if info:
            failures_seen = _eval_failures(json.loads(info[0].read_text())["metrics_port"])
        time.sleep(0.5)
    _, stderr = result.proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert result.proc.returncode == 0, stderr[-3000:]
    assert failures_seen >= 1, "no evaluation failure reached the coordinator while the job ran"

    run_dir = next((tmp_path / "runs").glob("*/summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "COMPLETED" and max(int(step) for step in summary["losses"]) == STEPS
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert records and all("error" in r and "sources" not in r for r in records), records
    assert "held-out evaluation failed" in stderr  # the launcher's final evaluation fails alike, and says so
    assert "evaluation of step" in Path(run_dir / "coordinator.log").read_text()
