"""Nothing outlives its job: `hyrun launch` is SIGKILLed at several moments of a job (its nodes
registering, its workers starting, a checkpoint being staged, training), and 30 s later no process
of the job is alive, and once the clean-up an agent runs at start has run, the job's shared-memory
folder holds nothing of it. Moments are read from the run directory and the shm folder, never
guessed with fixed sleeps."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import job_dict
from hyrun.common.snapshots import SHM_DIR_ENV, free_orphaned_snapshots

LEFTOVER_BOUND_S = 30.0


def _logs(run_root: Path, pattern: str) -> str:
    return "".join(p.read_text(errors="replace") for p in run_root.glob(pattern))


def _registering(run_root: Path, shm: Path) -> bool:
    return "registered" in _logs(run_root, "*/coordinator.log")


def _workers_starting(run_root: Path, shm: Path) -> bool:
    return "-> pid" in _logs(run_root, "*/agent-*.log") and "first step done" not in _logs(run_root, "*/generation-*/*/rank-*.log")


def _checkpointing(run_root: Path, shm: Path) -> bool:
    # A rank's first snapshot exists: it is being staged, and its checkpoint persisted.
    return any(p.name.startswith("hyrun-") and not p.name.endswith(".owner") for p in shm.iterdir())


def _training(run_root: Path, shm: Path) -> bool:
    return "committed step" in _logs(run_root, "*/generation-*/*/rank-*.log")


MOMENTS = {"registration": _registering, "worker start-up": _workers_starting,
           "checkpoint": _checkpointing, "training": _training}  # fmt: skip


def _processes_of(marker: str) -> list[psutil.Process]:
    """Live processes whose command line or environment names `marker` (the job's tmp folder)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(process.cmdline()) or any(marker in v for v in process.environ().values()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.timeout(240)
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_sigkilled_launcher_leaves_no_process_and_no_snapshot(write_job, launched, tmp_path, monkeypatch, moment):
    shm = tmp_path / "shm"  # private: the job's snapshots and ownership records, and nothing else
    shm.mkdir()
    monkeypatch.setenv(SHM_DIR_ENV, str(shm))  # every process of the job inherits it: how we find them
    job = job_dict(training={"steps": 100_000}, checkpoint={"interval_steps": 2})
    run_root = tmp_path / "runs"
    launcher = launched("launch", str(write_job(job)), "--no-progress")

    reached = MOMENTS[moment]
    deadline = time.monotonic() + 150
    while not (run_root.exists() and reached(run_root, shm)):
        assert launcher.proc.poll() is None, f"the launch ended before {moment}: {launcher.proc.communicate()}"
        assert time.monotonic() < deadline, f"never reached {moment}"
        launcher.descendants()
        time.sleep(0.02)
    launcher.descendants()
    os.kill(launcher.proc.pid, signal.SIGKILL)
    launcher.proc.wait()

    deadline = time.monotonic() + LEFTOVER_BOUND_S
    while (left := _processes_of(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"alive {LEFTOVER_BOUND_S:.0f} s after the launcher's SIGKILL at {moment}: " + "; ".join(
        f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left
    )

    # What an agent runs when it starts on this host: whatever a dead job left is freed.
    free_orphaned_snapshots(shm)
    (job_dir,) = run_root.iterdir()
    leftovers = [p.name for p in shm.iterdir() if job_dir.name in p.name]
    assert leftovers == [], f"the job's snapshots outlived it ({moment}): {leftovers}"
