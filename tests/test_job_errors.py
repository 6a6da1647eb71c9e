"""A job error is not a card fault: an error that follows the work from card to card (here rank 0,
which creates the checkpoint folder, on whatever card holds it) fails the job with that error and
leaves no card quarantined (real processes, a real coordinator)."""

from __future__ import annotations

import json

import pytest

from conftest import job_dict


@pytest.mark.timeout(200)
def test_the_same_error_on_every_rank_fails_the_job_and_blames_no_card(write_job, launched, tmp_path):
    not_a_folder = tmp_path / "checkpoints"
    not_a_folder.write_text("a file where the job's checkpoint folder should be\n")
    job = job_dict(checkpoint={"directory": str(not_a_folder), "interval_steps": 2})
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=180)
    assert result.proc.returncode == 1, stderr
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert "the job, not a card, is at fault" in summary["message"], summary["message"]
    assert "NotADirectoryError" in summary["message"]
    assert summary["evictions"] == [] and summary["generations"] == 2  # the second card to fail settles it
    assert result.alive_seen() == []
