"""A bad job file is refused before anything starts, with a message that names the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hyrun.runtime.jobfile import JobFileError, load_job, parse_job

from conftest import job_dict


def _bad(**sections) -> dict:
    return job_dict(**sections)


BAD_JOBS = {
    "unknown key": (_bad(training={"stepz": 3}), "training.stepz"),
    "wrong type": (_bad(training={"steps": "many"}), "training.steps"),
    "negative count": (
        _bad(cluster={"nodes": [{"name": "n", "cards": [{"type": "cpu-sim", "count": -1}]}]}),
        "cluster.nodes.0.cards.0.count",
    ),
    "unknown preset": (_bad(model={"preset": "gigantic"}), "model"),
    "batch not divisible": (_bad(training={"global_batch": 7, "micro_batch": 2}), "training"),
    "timeout below interval": (_bad(runtime={"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 1.5}), "runtime"),
    "bad store": (_bad(store="redis://x"), "store"),
    "degrees do not multiply to cards": (_bad(parallelism={"dp": 2, "tp": 3}), "parallelism"),
    "too few micro-batches": (_bad(training={"global_batch": 2, "micro_batch": 1}), "training"),
}


@pytest.mark.parametrize("kind", sorted(BAD_JOBS))
def test_bad_job_names_the_field(kind):
    job, field = BAD_JOBS[kind]
    with pytest.raises(JobFileError) as error:
        parse_job(job)
    assert f"  {field}:" in str(error.value), str(error.value)


def test_value_and_allowed_range_are_shown():
    with pytest.raises(JobFileError) as error:
        parse_job(_bad(training={"steps": 0}))
    message = str(error.value)
    assert "training.steps" in message and "greater than or equal to 1" in message and "(got 0)" in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(JobFileError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster: [unclosed")
    with pytest.raises(JobFileError, match="not valid YAML"):
        load_job(broken)


def test_example_jobs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")):
        if "chaos" not in path.name:
            load_job(path)


@pytest.mark.timeout(60)
def test_cli_refuses_bad_job_with_exit_2_and_no_traceback(write_job):
    path = write_job(_bad(training={"steps": -3}))
    result = subprocess.run(
        [sys.executable, "-m", "hyrun.runtime.cli", "launch", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "training.steps" in result.stderr
    assert "Traceback" not in result.stderr
