"""The operator's commands on what a finished run leaves behind, as a new user meets them: `hyrun status`
of an ended job, `hyrun ckpt ls/verify` of a run directory, tables that stay whole when output is
captured, and chaos reports that list only the parameters a fault uses. Torch-free and fast."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hyrun.runtime.checkpoint.cli import app as ckpt_app
from hyrun.runtime.checkpoint.manifest import Manifest, hash_file
from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.jobfile import FaultSpec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def hyrun(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, its output captured (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "hyrun.runtime.cli", *args], capture_output=True, text=True, timeout=100, cwd=ROOT
    )


def ended_run(tmp_path: Path, message: str = "trained 40 steps in 44.5 s") -> Path:
    run = tmp_path / "runs" / "quickstart-20261129-200402-e571"
    (run / "checkpoints").mkdir(parents=True)
    (run / "coordinator.json").write_text(json.dumps({"address": "127.0.0.1:1", "metrics_port": 1}))
    (run / "token").write_text("x")
    summary = {
        "job_id": run.name, "state": "COMPLETED", "message": message, "wall_time_s": 45.2, "generations": 2,
        "evictions": ["node-b/card1 (worker exited)"], "steps_lost": 3, "losses": {"1": 5.5, "39": 3.3, "40": 3.2},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def commit_checkpoint(directory: Path, step: int) -> Path:
    storage = LocalDirectoryStorage(directory)
    storage.prepare(step)
    (storage.staging_path(step) / "__0_0.distcp").write_bytes(b"tensor bytes")
    files = {"__0_0.distcp": hash_file(storage.staging_path(step) / "__0_0.distcp")}
    manifest = Manifest(step=step, job_id="j", world_size=1, layout={}, extra={}, rng_by_rank={}, files=files)
    storage.write_manifest(step, manifest.to_json())
    storage.commit(step)
    return storage.committed_path(step)


def test_status_of_an_ended_job_reads_its_summary(tmp_path):
    long_message = "trained 40 steps in 44.5 s " + "after a long story " * 8
    run = ended_run(tmp_path, long_message)
    result = hyrun("status", "--run", str(run))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"job {run.name}: completed (ended" in out
    assert "steps 3 (last 40, loss 5.5000 -> 3.2000), generations 2, steps trained again 3" in out
    assert f"logs: {run}/coordinator.log" in out and "evicted node-b/card1" in out
    assert f"checkpoints: {run / 'checkpoints'}" in out
    assert any(line.strip() == long_message.strip() for line in out.splitlines()), "wrapped when captured"
    assert "grpc" not in (out + result.stderr).lower()


def test_status_of_a_run_whose_launch_died_says_so(tmp_path):
    run = ended_run(tmp_path)
    (run / "summary.json").unlink()
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (run / "coordinator.json").write_text(json.dumps({"address": f"127.0.0.1:{port}", "metrics_port": 1}))
    result = hyrun("status", "--run", str(run))
    assert result.returncode == 1
    assert "does not answer" in result.stderr and "no summary.json" in result.stderr


def test_ckpt_ls_and_verify_accept_a_run_directory(tmp_path):
    run = ended_run(tmp_path)
    commit_checkpoint(run / "checkpoints", 10)
    commit_checkpoint(run / "checkpoints", 20)
    listing = CliRunner().invoke(ckpt_app, ["ls", str(run)])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()[1:]] == ["step-000000010", "step-000000020"]
    verify = CliRunner().invoke(ckpt_app, ["verify", str(run)])
    assert verify.exit_code == 0 and verify.output.count(": ok") == 2


def test_a_verify_that_checked_nothing_fails(tmp_path):
    run = ended_run(tmp_path)
    (run / "checkpoints" / "step-000000010.tmp").mkdir()  # a save that never committed
    verify = CliRunner().invoke(ckpt_app, ["verify", str(run)])
    assert verify.exit_code == 1
    assert "nothing verified: no committed checkpoints in" in verify.output
    assert "step-000000010.tmp" in verify.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(ckpt_app, ["verify", str(empty)]).exit_code == 1
    listing = CliRunner().invoke(ckpt_app, ["ls", str(empty)])  # an empty listing is still a listing
    assert listing.exit_code == 0 and "no committed checkpoints" in listing.output


def test_verify_of_a_damaged_checkpoint_in_a_run_directory_fails(tmp_path):
    run = ended_run(tmp_path)
    folder = commit_checkpoint(run / "checkpoints", 10)
    (folder / "__0_0.distcp").write_bytes(b"tensor bytez")
    verify = CliRunner().invoke(ckpt_app, ["verify", str(run)])
    assert verify.exit_code == 1 and "DAMAGED __0_0.distcp: sha256" in verify.output


def test_plan_table_is_not_wrapped_when_captured():
    from hyrun.planner import format_comparison
    from hyrun.runtime.coordinator.planning import plan_job
    from hyrun.runtime.jobfile import load_job

    expected = format_comparison(plan_job(load_job(ROOT / "examples" / "quickstart.yaml")))
    assert max(map(len, expected.splitlines())) > 80, "the table must be wider than rich's default to test this"
    result = hyrun("plan", "examples/quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


@pytest.mark.parametrize(
    "fault, used",
    [
        ({"kind": "kill"}, {"kind", "node", "card", "at_step", "generation"}),
        ({"kind": "slow", "speed": 0.5}, {"kind", "node", "card", "at_step", "generation", "speed"}),
        ({"kind": "nan_grad"}, {"kind", "node", "card", "at_step", "generation", "repeat_steps"}),
        ({"kind": "xid", "xid": 48}, {"kind", "node", "card", "at_step", "generation", "xid"}),
        ({"kind": "link_slow"}, {"kind", "node", "at_step", "mbit", "duration_s"}),
        ({"kind": "partition", "duration_s": 3}, {"kind", "node", "at_step", "duration_s"}),
    ],
)
def test_a_fault_lists_only_the_parameters_its_kind_uses(fault, used):
    spec = FaultSpec.model_validate({"node": "node-a", "at_step": 3, **fault})
    assert set(spec.model_dump(include=spec.used_fields())) == used
