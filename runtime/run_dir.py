"""What an embedded launch leaves in its run directory, read back for the operator's commands: whether the
job has ended (`summary.json`, written last by `hyrun launch`) and where its checkpoints are. Torch- and
gRPC-free, so `hyrun status` and `hyrun ckpt` answer fast."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY_NAME = "summary.json"
CHECKPOINTS_NAME = "checkpoints"  # the job file's default checkpoint.directory (RUN_DIR/checkpoints)


def ended_job_lines(run: Path) -> list[str] | None:
    """A few lines saying how the job of this run directory ended, or None if it has not (no summary)."""
    path = run / SUMMARY_NAME
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return [f"{run}: the job has ended, but {path} is unreadable ({error})", f"  logs: {run}"]
    losses = {int(step): loss for step, loss in summary.get("losses", {}).items()}
    state = str(summary.get("state", "unknown")).lower()
    lines = [f"job {summary.get('job_id', run.name)}: {state} (ended; no coordinator runs for it any more)"]
    if summary.get("message"):
        lines.append(f"  {summary['message']}")
    steps = f"  steps {len(losses)}"
    if losses:
        steps += f" (last {max(losses)}, loss {losses[min(losses)]:.4f} -> {losses[max(losses)]:.4f})"
    steps += f", generations {summary.get('generations', '?')}, steps trained again {summary.get('steps_lost', '?')}"
    if "wall_time_s" in summary:
        steps += f", wall {summary['wall_time_s']:.1f} s"
    lines.append(steps)
    lines += [f"  evicted {eviction}" for eviction in summary.get("evictions", [])]
    lines.append(f"  logs: {run}/coordinator.log, {run}/agent-*.log, {run}/generation-*/NODE/rank-*.log")
    if (run / CHECKPOINTS_NAME).is_dir():
        lines.append(f"  checkpoints: {run / CHECKPOINTS_NAME} (hyrun ckpt ls {run})")
    return lines


def checkpoint_directory(directory: Path) -> Path:
    """The checkpoint directory `directory` names: itself, or a run directory's `checkpoints/`."""
    inner = directory / CHECKPOINTS_NAME
    holds_steps = any(path.name.startswith("step-") for path in directory.iterdir())
    return inner if inner.is_dir() and not holds_steps else directory
