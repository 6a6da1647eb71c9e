"""Recovery after a SIGKILLed worker: hyrun's in-job recovery vs a torchrun-style full restart.

Each repetition runs a 4-card CPU job (2 nodes x 2 simulated cards) in which one worker SIGKILLs
itself at a fixed step. hyrun detects it, evicts the card and resumes on the other 3 from the newest
checkpoint. The baseline, measured in the same run, is what torchrun + DCP do: stop everything,
start every process again, rendezvous, load the same checkpoint, train. Its restart time is measured
by launching a fresh job that resumes from the same checkpoint directory, and it is charged the
same detection time hyrun measured (generous to the baseline: torchrun's agent polls at 0.1-5 s).

    python benchmarks/recovery.py [--repeats 5] [--steps 16] [--kill-at 9] [--interval 4]

Prints per repetition and the medians: time to detect, time until the next step completes, steps
lost, and the ratio baseline / hyrun of kill -> next step (last line).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (imported before the launcher: the first import is slow, keep it out of timings)

from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import run_job
from hyrun.common.security import TlsFiles


def job_dict(run_dir: Path, ckpt_dir: Path, steps: int, interval: int, faults: list[dict]) -> dict:
    return {
        "name": "recovery-bench",
        "cluster": {
            "nodes": [
                {"name": "node-a", "cards": [{"type": "cpu-sim", "count": 2}]},
                {"name": "node-b", "cards": [{"type": "cpu-sim", "count": 2}]},
            ]
        },
        "model": {"preset": "tiny"},
        "training": {"steps": steps, "global_batch": 8, "micro_batch": 2, "seq_len": 32, "schedule": {"warmup_steps": 1}},
        "checkpoint": {"directory": str(ckpt_dir), "interval_steps": interval, "keep_last": 100},  # the restart needs the old ones
        "runtime": {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "run_dir": str(run_dir)},
        "fault_tolerance": {"failure_grace_s": 0.3},
        "faults": faults,
    }


def run(job: dict, on_event=lambda event: None):
    spec = parse_job(job)
    return run_job(spec, spec.model_dump_json(), coordinator=None, token="", tls=TlsFiles(), on_event=on_event)


def hyrun_recovery(tmp: Path, args) -> dict:
    faults = [{"kind": "kill", "node": "node-b", "card": 1, "at_step": args.kill_at}]
    outcome = run(job_dict(tmp / "runs", tmp / "ckpt", args.steps, args.interval, faults))
    if not outcome.succeeded or len(outcome.incidents) != 1:
        raise SystemExit(f"hyrun run did not recover as expected: {outcome.state} {outcome.message}")
    incident = outcome.incidents[0]
    detect_s = incident["detected_at_s"] - incident["last_step_before_s"]
    resume_s = incident["resumed_at_s"] - incident["detected_at_s"]
    return {
        "detect_s": detect_s,
        "kill_to_step_s": detect_s + resume_s,
        "steps_lost": int(incident["steps_lost"]),
        "resumed_step": int(incident["resumed_step"]),
    }


def checkpoints_up_to(source: Path, target: Path, last_step: int) -> None:
    """The checkpoints hyrun could resume from at the kill: none written after it."""
    target.mkdir()
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("step-") and entry.name[5:].isdigit() and int(entry.name[5:]) <= last_step:
            shutil.copytree(entry, target / entry.name)


def full_restart(tmp: Path, args, hy: dict) -> dict:
    """All processes started again on the same 4 cards, resuming from the same checkpoint."""
    checkpoints_up_to(tmp / "ckpt", tmp / "ckpt-restart", hy["resumed_step"] - 1)
    first_step_at: list[float] = []
    started = time.monotonic()

    def on_event(event) -> None:
        if event.step and not first_step_at:
            first_step_at.append(time.monotonic())

    outcome = run(job_dict(tmp / "runs-restart", tmp / "ckpt-restart", args.steps, args.interval, []), on_event)
    if not outcome.succeeded or not first_step_at:
        raise SystemExit(f"restart run failed: {outcome.state} {outcome.message}")
    resumed_step = min(outcome.losses)
    lost = max(0, (args.kill_at - 1) - (resumed_step - 1))
    return {"detect_s": hy["detect_s"], "kill_to_step_s": hy["detect_s"] + first_step_at[0] - started, "steps_lost": lost}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kill-at", type=int, default=9, help="the step at whose start the worker dies")
    parser.add_argument("--interval", type=int, default=4, help="checkpoint interval in steps")
    args = parser.parse_args()

    rows = []
    for repeat in range(1, args.repeats + 1):
        with tempfile.TemporaryDirectory(prefix="hyrun-recovery-") as tmp:
            hy = hyrun_recovery(Path(tmp), args)
            base = full_restart(Path(tmp), args, hy)
        rows.append((hy, base))
        print(
            f"run {repeat}: hyrun detect {hy['detect_s']:.2f} s, kill->step {hy['kill_to_step_s']:.2f} s, "
            f"lost {hy['steps_lost']} | full restart kill->step {base['kill_to_step_s']:.2f} s, lost {base['steps_lost']}",
            flush=True,
        )
    med = lambda key, side: statistics.median(r[side][key] for r in rows)  # noqa: E731
    print(f"median hyrun:        detect {med('detect_s', 0):.2f} s, kill->next step {med('kill_to_step_s', 0):.2f} s, "
          f"steps lost {med('steps_lost', 0):.0f} (checkpoint every {args.interval})")
    print(f"median full restart: kill->next step {med('kill_to_step_s', 1):.2f} s, steps lost {med('steps_lost', 1):.0f}")
    ratio = med("kill_to_step_s", 1) / med("kill_to_step_s", 0)
    print(f"recovery speedup (full restart / hyrun, kill -> next step): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
