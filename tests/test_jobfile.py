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


# What a generation's start would refuse, refused before launch (check_job), with the field and what is allowed.
ONE_NODE = {"nodes": [{"name": "n0", "cards": [{"type": "cpu-sim", "count": 2}]}]}
UNLAUNCHABLE = {
    "model fits no card": (
        _bad(cluster=ONE_NODE, model={"preset": "tiny", "overrides": {"hidden_size": 1 << 20}}),
        ["model.overrides={'hidden_size': 1048576}", "GiB per card", "16.0 GiB"],
    ),
    "unknown card type": (
        _bad(cluster={"nodes": [{"name": "n0", "cards": [{"type": "H900", "count": 2}]}]}),
        ["cluster.nodes.0.cards.0.type", "'H900'", "H100-SXM", "cluster.card_types"],
    ),
    "degrees fit no layout": (
        _bad(cluster={"nodes": [{"name": "n0", "cards": [{"type": "cpu-sim", "count": 3}]}]},
             training={"global_batch": 6, "micro_batch": 2}, parallelism={"tp": 3}),
        ["parallelism {tp=3", "no layout is possible with", "the 3 micro-batches"],
    ),
}


@pytest.mark.parametrize("kind", sorted(UNLAUNCHABLE))
def test_check_job_refuses_what_no_generation_could_start(kind):
    from hyrun.runtime.coordinator.planning import check_job

    job, expected = UNLAUNCHABLE[kind]
    with pytest.raises(JobFileError) as error:
        check_job(parse_job(job))
    for text in expected:
        assert text in str(error.value), str(error.value)
    assert len(str(error.value)) < 1200


def test_check_job_passes_the_examples():
    from pathlib import Path

    from hyrun.runtime.coordinator.planning import check_job

    for path in sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")):
        if "chaos" not in path.name:
            check_job(load_job(path))


def test_a_job_file_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: caf\xe9\ncluster: {}\n")  # latin-1, as an editor might save it
    with pytest.raises(JobFileError, match=r"not UTF-8 text: byte 0xe9 at line 1.*save it as UTF-8"):
        load_job(path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["launch", "plan"])
def test_cli_refuses_an_unlaunchable_job_with_exit_2(write_job, tmp_path, command):
    # Before any process starts: today such a job starts and every rank dies allocating.
    huge = write_job(UNLAUNCHABLE["model fits no card"][0], name="huge.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    for path, expected in ((huge, "GiB per card"), (latin1, "not UTF-8")):
        result = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", command, str(path)],
                                capture_output=True, text=True, timeout=60)
        said = " ".join(result.stderr.split())  # the console wraps long lines
        assert result.returncode == 2, said
        assert expected in said and "Traceback" not in said, said
        assert not (tmp_path / "runs").exists()  # nothing was started
