"""Storage faults, real: the checkpoint directory on a size-limited tmpfs that fills mid-run
(`disk_full`), and the job-state store (an etcd of the job's own) stopped under a running job
(`store_outage`). The job must finish with the fault-free losses, the failed save or the outage must
be on record, and a save torn by the full disk must never be what a resume picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.storage_faults import FILLER_NAME
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from conftest import ETCD, job_dict

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="disk_full mounts a tmpfs: needs root")


def _run(write_job, launched, tmp_path, job: dict, timeout_s: float = 200) -> tuple[dict, str]:
    result = launched("launch", str(write_job(job)), "--no-progress")
    _, stderr = result.proc.communicate(timeout=timeout_s)
    assert result.proc.returncode == 0, stderr[-4000:]
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    assert result.alive_seen() == []
    return json.loads(summary.read_text()), stderr


def _reference_losses(steps: int) -> dict[int, float]:
    torch.set_num_threads(1)
    reference = Reporter(None)
    train(parse_job(job_dict(training={"steps": steps})), RankWork(), reference)
    return {record.step: record.loss for record in reference.history}


def _mounted(path) -> bool:
    return any(line.split()[1] == str(path) for line in open("/proc/mounts"))


@needs_root
@pytest.mark.timeout(300)
def test_a_disk_that_fills_mid_run_fails_saves_not_the_job_and_a_resume_skips_the_torn_save(write_job, launched, tmp_path):
    # Full from step 11 for good; a worker killed at step 14 must resume from a save that committed
    # before the disk filled (never one torn by it), and the job still ends with the right losses.
    job = job_dict(
        training={"steps": 16},
        checkpoint={"interval_steps": 2, "keep_last": 20},
        faults=[{"kind": "disk_full", "at_step": 11, "disk_mb": 64},
                {"kind": "kill", "node": "node-b", "card": 1, "at_step": 14}],
    )  # fmt: skip
    summary, _ = _run(write_job, launched, tmp_path, job)
    failed = [i for i in summary["incidents"] if i["verdict"] == "save_failed"]
    # ENOSPC as the OS says it, or as torch's zip writer does when its write came up short.
    assert failed and any(s in failed[0]["reason"] for s in ("No space left", "unexpected pos")), summary["incidents"]
    reference = _reference_losses(16)
    for step, loss in reference.items():  # no torn state was loaded
        assert summary["losses"][str(step)] == pytest.approx(loss, rel=1e-4), step

    # The tmpfs is gone; what it held was kept (whole committed saves), the filler was not.
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoints = run_dir / "checkpoints"
    assert not _mounted(checkpoints) and not (checkpoints / FILLER_NAME).exists()
    committed = LocalDirectoryStorage(checkpoints).committed_steps()
    assert all(step <= 10 for step in committed), committed  # saves begun after the disk filled never committed
    (evicted,) = [i for i in summary["incidents"] if i["verdict"] == "evict"]
    assert int(evicted["resumed_step"]) - 1 in [0, *committed]
    if committed:  # on a box slower at saving than at stepping, the disk may fill before any save commits
        verify = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "ckpt", "verify", str(run_dir)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.skipif(ETCD is None, reason="the etcd binary is not installed (apt-get install etcd-server)")
@pytest.mark.timeout(300)
def test_the_store_stopped_under_a_running_job_is_ridden_out_and_caught_up(write_job, launched, tmp_path):
    job = job_dict(
        training={"steps": 10},
        checkpoint={"interval_steps": 2},
        faults=[{"kind": "store_outage", "at_step": 3, "duration_s": 6}],
    )
    summary, _ = _run(write_job, launched, tmp_path, job)
    assert summary["generations"] == 1 and summary["evictions"] == []
    (outage,) = summary["incidents"]
    assert outage["verdict"] == "store_outage" and float(outage["resumed_at_s"]) > float(outage["detected_at_s"])
    reference = _reference_losses(10)
    for step, loss in reference.items():
        assert summary["losses"][str(step)] == pytest.approx(loss, rel=1e-4), step
    # The job's own etcd is stopped with the job.
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not [p for p in psutil_processes() if str(run_dir / "etcd") in " ".join(p)]


def psutil_processes() -> list[list[str]]:
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        out.append(proc.info["cmdline"] or [])
    return out


def test_storage_faults_that_cannot_be_set_up_are_refused_before_anything_starts(write_job, tmp_path):
    job = job_dict(store="etcd://127.0.0.1:1", faults=[{"kind": "store_outage", "at_step": 2}])
    out = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "launch", str(write_job(job)), "--no-progress"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "names its own store" in " ".join(out.stderr.split()), out.stderr
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="drop `node: node-a`"):
        parse_job(job_dict(faults=[{"kind": "disk_full", "node": "node-a", "at_step": 2}]))
    with pytest.raises(ValueError, match="name the node"):
        parse_job(job_dict(faults=[{"kind": "kill", "at_step": 2}]))
