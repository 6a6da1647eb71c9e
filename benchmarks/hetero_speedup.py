"""Mixed cards: the planner's plan vs the naive uniform plan, measured on this machine in one run.

A 4-card simulated cluster (two cards at speed 1.0, two at 0.4) trains the same job twice: once
with the global batch split evenly (what a homogeneous framework does: `parallelism: {dp: 4, split:
even}`), once
with `parallelism: auto`, where the planner gives each card micro-batches in proportion to what it
can do. Then the planner is calibrated on the naive run alone (each card's speed from its measured
busy compute, and the per-step time the cost model does not see: data, Python, all-reduce latency),
and its prediction for the planned run is compared with what that run measured.

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

import numpy as np

from hyrun.planner import DATA_PARALLEL_ONLY, Degrees, calibrate, naive_plan, search
from hyrun.planner.evaluate import evaluate, grid_context, model_tables, uniform_placement
from hyrun.planner.layout import BlockTable, naive_blocks
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import run_job
from hyrun.runtime.coordinator.planning import card_ids, planner_inputs
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.common.security import TlsFiles

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


def predict_data_parallel(cluster, shape, training, micro_batches_by_card: list[int]) -> float:
    """The cost model's step time for one data-parallel rank per card (card-id order) with the given
    split — the plan the runtime ran, re-costed on a calibrated cluster."""
    tables = model_tables(shape, training)
    table = BlockTable.of(naive_blocks(cluster, 1))
    degrees = Degrees(pp=1, dp=len(micro_batches_by_card), cp=1, tp=1, ep=1)
    grid = np.arange(degrees.dp).reshape(1, degrees.dp)
    ctx = grid_context(tables, degrees, table, grid, uniform_placement(tables, 1, 1))
    return evaluate(ctx, (shape.num_layers,), np.array(micro_batches_by_card)).step_time_s


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
    parser.add_argument("--rounds", type=int, default=2, help="alternating naive/planner runs; medians are reported")
    args = parser.parse_args()

    naive_runs, planned_runs = [], []
    with tempfile.TemporaryDirectory(prefix="hyrun-hetero-") as tmp:
        naive_job = job_dict(Path(tmp), args, {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "ep": 1, "split": "even"})
        planned_job = job_dict(Path(tmp), args, "auto")
        # Alternate the two so that load from anything else on the machine falls on both alike.
        for round_number in range(1, args.rounds + 1):
            naive_runs.append(measure(naive_job))
            planned_runs.append(measure(planned_job))
            print(f"round {round_number}: naive {naive_runs[-1][0] * 1e3:.0f} ms/step, "
                  f"planner {planned_runs[-1][0] * 1e3:.0f} ms/step", flush=True)
    naive_s = statistics.median(run[0] for run in naive_runs)
    planned_s = statistics.median(run[0] for run in planned_runs)
    tokens, naive_split, planned_split = naive_runs[0][2], naive_runs[0][3], planned_runs[0][3]
    naive_compute = {card: statistics.median(run[1][card] for run in naive_runs) for card in naive_runs[0][1]}
    print(f"naive (even split {sorted(naive_split.values())}): {naive_s * 1e3:.0f} ms/step, {tokens / naive_s:,.0f} tokens/s")
    print(f"planner (split {sorted(planned_split.values())}): {planned_s * 1e3:.0f} ms/step, {tokens / planned_s:,.0f} tokens/s")

    # Calibrate on the naive run, then predict the plan the runtime ran.
    spec = parse_job(planned_job)
    cluster, shape, training = planner_inputs(spec)
    ids = card_ids(cluster)
    naive = naive_plan(cluster, shape, training)
    calibrated = calibrate(cluster, {ids[card]: s for card, s in naive_compute.items()}, plan=naive)
    ran = [planned_split[card] for card in sorted(planned_split, key=lambda c: ids[c])]
    # Two things are calibrated on the naive run alone: each card's speed (from its busy compute)
    # and the per-step time the cost model does not see (data, Python, all-reduce latency).
    naive_split_by_id = [naive_split[card] for card in sorted(naive_split, key=lambda c: ids[c])]
    overhead_s = naive_s - predict_data_parallel(calibrated, shape, training, naive_split_by_id)
    predicted_s = predict_data_parallel(calibrated, shape, training, ran) + overhead_s
    print(f"calibration on the naive run: per-card speeds, and {overhead_s * 1e3:.0f} ms/step the cost model does not see")
    best = search(calibrated, shape, training, constraints=DATA_PARALLEL_ONLY, include_naive=False).best
    print(f"calibrated, the cost model predicts {predicted_s * 1e3:.0f} ms/step for the split that ran {ran} "
          f"(and would now pick {list(best.micro_batches_per_replica)})")
    error = abs(predicted_s - planned_s) / planned_s
    print(f"prediction error vs measured: {error:.1%} (goal <= 10%)")
    print(f"measured speedup planner / naive: {naive_s / planned_s:.2f}x (goal >= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
