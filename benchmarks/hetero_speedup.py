"""Mixed cards: the planner's plan vs the naive uniform plan, measured on this machine in one run.

A 4-card simulated cluster (two cards at speed 1.0, two at 0.4) trains the same job twice: once
with the global batch split evenly (what a homogeneous framework does: `parallelism: {dp: 4}`), once
with `parallelism: auto`, where the planner gives each card micro-batches in proportion to what it
can do. Then the planner is calibrated on the naive run's measured per-card compute times and its
prediction for the planned run is compared with what that run measured.

    python benchmarks/hetero_speedup.py [--steps 24] [--slow-speed 0.4]

Prints the measured throughput of both, the speedup (goal >= 1.3x) and the prediction error
(goal <= 10%), last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (the first import is slow; keep it out of the timings)

from hyrun.planner import DATA_PARALLEL_ONLY, calibrate, naive_plan, search
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import run_job
from hyrun.runtime.planning import card_ids, planner_inputs
from hyrun.runtime.coordinator.policy import CardRef
from hyrun.runtime.security import TlsFiles

WARMUP_STEPS = 4


def job_dict(run_dir: Path, args, parallelism) -> dict:
    return {
        "name": "hetero",
        "cluster": {
            "nodes": [
                {"name": "fast", "cards": [{"type": "cpu-sim", "count": 2, "speed": 1.0}]},
                {"name": "slow", "cards": [{"type": "cpu-sim", "count": 2, "speed": args.slow_speed}]},
            ]
        },
        "model": {"preset": "tiny"},
        "training": {"steps": args.steps, "global_batch": args.global_batch, "micro_batch": 2, "seq_len": 64,
                     "schedule": {"warmup_steps": 2}},
        "parallelism": parallelism,
        "checkpoint": {"interval_steps": 0},
        "runtime": {"heartbeat_interval_s": 0.5, "run_dir": str(run_dir), "warm_workers": 0},
    }  # fmt: skip


def measure(job: dict):
    """(median step time, median per-card compute time by CardRef, tokens per step, split)."""
    spec = parse_job(job)
    step_times: list[float] = []
    compute: dict[CardRef, list[float]] = {}
    split: dict[CardRef, int] = {}

    def on_event(event) -> None:
        if event.step > WARMUP_STEPS and event.step_time_s > 0 and len(step_times) < event.step - WARMUP_STEPS:
            step_times.append(event.step_time_s)
            for rank in event.ranks:
                card = CardRef(rank.node, rank.card_index)
                compute.setdefault(card, []).append(rank.compute_time_s)
                split[card] = rank.micro_batches

    outcome = run_job(spec, spec.model_dump_json(), coordinator=None, token="", tls=TlsFiles(), on_event=on_event)
    if not outcome.succeeded:
        raise SystemExit(f"run failed: {outcome.message}")
    tokens = spec.training.global_batch * spec.training.seq_len
    return statistics.median(step_times), {c: statistics.median(v) for c, v in compute.items()}, tokens, split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--slow-speed", type=float, default=0.4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hyrun-hetero-") as tmp:
        naive_job = job_dict(Path(tmp), args, {"dp": 4})
        planned_job = job_dict(Path(tmp), args, "auto")
        naive_s, naive_compute, tokens, naive_split = measure(naive_job)
        print(f"naive (even split {sorted(naive_split.values())}): {naive_s * 1e3:.0f} ms/step, {tokens / naive_s:,.0f} tokens/s", flush=True)
        planned_s, _, _, planned_split = measure(planned_job)
        print(f"planner ({[planned_split[c] for c in sorted(planned_split, key=str)]}): {planned_s * 1e3:.0f} ms/step, "
              f"{tokens / planned_s:,.0f} tokens/s", flush=True)  # fmt: skip

    # Calibrate on the naive run, then predict the plan the runtime ran.
    spec = parse_job(planned_job)
    cluster, shape, training = planner_inputs(spec)
    ids = card_ids(cluster)
    naive = naive_plan(cluster, shape, training)
    calibrated = calibrate(cluster, {ids[card]: s for card, s in naive_compute.items()}, plan=naive)
    predicted = search(calibrated, shape, training, constraints=DATA_PARALLEL_ONLY, include_naive=False).best
    predicted_split = sorted(predicted.micro_batches_per_replica)
    error = abs(predicted.step_time_s - planned_s) / planned_s
    print(f"calibrated planner picks split {predicted_split} (ran {sorted(planned_split.values())}), "
          f"predicts {predicted.step_time_s * 1e3:.0f} ms/step")
    print(f"prediction error vs measured: {error:.1%} (goal <= 10%)")
    print(f"measured speedup planner / naive: {naive_s / planned_s:.2f}x (goal >= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
