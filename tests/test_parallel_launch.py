"""5D layouts through `hyrun launch`: explicit degrees run as given, a lost card is replaced by a
smaller layout of the same kind, and the run resumed from a checkpoint written by the other layout
trains exactly like one uninterrupted process (DCP reshards dense tensors, experts are keyed by id)."""

from __future__ import annotations

import json

import pytest
import torch

from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from conftest import job_dict

# Capacity large enough that no token overflows: routing then does not depend on how the batch is split.
MODEL = {"preset": "tiny", "overrides": {"capacity_factor": 16.0}}


def _reference_losses(steps: int) -> dict[int, float]:
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job_dict(model=MODEL, training={"steps": steps})), RankWork(), reference)
    return {record.step: record.loss for record in reference.history}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("degrees, after_loss", [
    ({"dp": 2, "tp": 2}, "dp=1 × tp=2"),
    ({"dp": 4, "ep": 2}, "dp=2, ep=2"),
])
def test_a_5d_run_loses_a_card_resumes_on_a_smaller_layout_and_matches_one_process(
        write_job, launched, tmp_path, degrees, after_loss):
    job = job_dict(
        model=MODEL,
        parallelism=degrees,
        training={"steps": 8},
        checkpoint={"interval_steps": 2},
        faults=[{"kind": "kill", "node": "node-b", "card": 1, "at_step": 6}],
    )
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=200)
    assert result.proc.returncode == 0, stderr
    assert result.alive_seen() == []
    (run,) = (tmp_path / "runs").glob("*/")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["generations"] == 2 and summary["evictions"][0].startswith("node-b/card1")
    (incident,) = summary["incidents"]
    assert int(incident["resumed_step"]) in (3, 5)
    log = (run / "coordinator.log").read_text()
    layouts = [line.rsplit("(", 1)[1].rstrip(")") for line in log.splitlines() if "started:" in line]
    assert len(layouts) == 2 and layouts[1] != layouts[0], layouts

    for step, loss in _reference_losses(8).items():
        assert summary["losses"][str(step)] == pytest.approx(loss, rel=1e-4), (step, layouts)


def test_degrees_that_do_not_fit_are_refused_before_anything_starts(write_job, launched):
    job = job_dict(parallelism={"dp": 1, "tp": 4})  # tensor parallelism stays inside a 2-card node
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=60)
    assert result.proc.returncode == 2
    assert "fits no layout" in stderr and "tp=4" in stderr and "relax the fixed degrees" in stderr


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault, evidence", [
    ({"kind": "nan_grad", "node": "node-a", "card": 1, "at_step": 2, "repeat_steps": 3}, "silent data corruption"),
    ({"kind": "hang", "node": "node-b", "card": 0, "at_step": 3}, "hung"),
])
def test_the_5d_engine_locates_a_bad_card_without_ddp_hooks(write_job, launched, tmp_path, fault, evidence):
    """Under tp=2 × dp=2 (FSDP reduces inside the backward, no hook sees local gradients) a card
    producing NaN is named by the forward that turned finite inputs into NaN, and a hung card by
    never reporting that it entered the step."""
    job = job_dict(
        model=MODEL, parallelism={"dp": 2, "tp": 2}, training={"steps": 8},
        fault_tolerance={"hang_timeout_s": 3.0}, faults=[fault],
    )  # fmt: skip
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=200)
    assert result.proc.returncode == 0, stderr
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    card = f"{fault['node']}/card{fault['card']}"
    assert [e.split(":")[0] for e in summary["evictions"]] == [card], summary["evictions"]
    assert evidence in summary["evictions"][0]
    assert sorted(map(int, summary["losses"])) == list(range(1, 9))
