"""Link faults on real network namespaces: detection time and throughput before, during and after
each fault, in one run, one table. Needs root (`hyrun launch --netns`).

Every scenario is the same job (4 nodes x 1 simulated card, data parallel, tiny model) with one
network fault at step FAULT_AT. The capped link runs twice: once with the congestion verdict off
(`health.link_drain_ratio` and `link_replan_ratio` near zero: capped but not replanned, the baseline) and once with it on;
the last column's ratio is the headline (goal: >= 1.3x).

    python benchmarks/network_faults.py [--steps 24] [--fault-at 8] [--mbit 4]

tokens/s are taken from when the launcher heard of each step (the same clock the coordinator uses),
over whole steps: before = steps 2 .. fault-1, during = fault .. the incident's step, after = the
steps the next generation was first to complete (recovery itself excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (imported before the launcher: the first import is slow, keep it out of timings)

from hyrun.common.security import TlsFiles
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import JobOutcome, run_job
from hyrun.runtime.network.hosts import unavailable_reason

HEARTBEAT_TIMEOUT_S = 3.0
GLOBAL_BATCH, SEQ_LEN = 8, 16


def job(run_dir: Path, steps: int, faults: list[dict], health: dict | None = None) -> dict:
    return {
        "name": "netbench",
        "cluster": {"nodes": [{"name": f"n{i}", "cards": [{"type": "cpu-sim", "count": 1}]} for i in range(4)]},
        "model": {"preset": "tiny"},
        "parallelism": {"tp": 1, "pp": 1, "cp": 1, "ep": 1},
        "training": {"steps": steps, "global_batch": GLOBAL_BATCH, "micro_batch": 2, "seq_len": SEQ_LEN,
                     "schedule": {"warmup_steps": 1}},
        "checkpoint": {"interval_steps": 2},
        "health": health or {},
        "runtime": {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "run_dir": str(run_dir)},
        "faults": faults,
    }


def run(spec: dict) -> tuple[JobOutcome, float | None]:
    parsed = parse_job(spec)
    outcome = run_job(parsed, parsed.model_dump_json(), coordinator=None, token="", tls=TlsFiles(),
                      on_event=lambda event: None, netns=True)
    fired = json.loads((outcome.run_dir / "summary.json").read_text())["injected_faults"]
    return outcome, (fired[0]["at_job_s"] if fired else None)


def tokens_per_s(outcome: JobOutcome, first: int, last: int) -> float | None:
    """Over steps first..last (inclusive), from the end of step first-1."""
    done = outcome.step_done_s
    if first - 1 not in done or last not in done or last < first:
        return None
    return (last - first + 1) * GLOBAL_BATCH * SEQ_LEN / (done[last] - done[first - 1])


def row(name: str, outcome: JobOutcome, fired_s: float | None, fault_at: int) -> dict:
    incident = outcome.incidents[0] if outcome.incidents else None
    detected = None if incident is None or fired_s is None else incident["detected_at_s"] - fired_s
    at_failure = int(incident["step_at_failure"]) if incident else max(outcome.losses)
    resumed = int(incident["resumed_step"]) if incident and int(incident["resumed_step"]) else None
    return {
        "fault": name, "state": outcome.state.lower(),
        "detected_s": detected, "verdict": incident["verdict"] if incident else "-",
        "before": tokens_per_s(outcome, 2, fault_at - 1),
        "during": tokens_per_s(outcome, fault_at, max(at_failure, fault_at)),
        # Steps the next generation was first to complete: past both its resume and the failure.
        "after": tokens_per_s(outcome, max(resumed, at_failure) + 2, max(outcome.losses)) if resumed else None,
        "evidence": incident["reason"] if incident else "no verdict",
        "verdicts": ", ".join(i["verdict"] for i in outcome.incidents) or "-",
        "steps_lost": outcome.steps_lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--fault-at", type=int, default=8)
    parser.add_argument("--mbit", type=float, default=4.0)
    args = parser.parse_args()
    if unavailable_reason():
        sys.exit(f"cannot run: {unavailable_reason()}")
    at, mbit = args.fault_at, args.mbit
    scenarios = [
        ("link_slow, verdict off (baseline)", [{"kind": "link_slow", "node": "n2", "at_step": at, "mbit": mbit}],
         {"link_drain_ratio": 1e-6, "link_replan_ratio": 1e-6}),
        ("link_slow", [{"kind": "link_slow", "node": "n2", "at_step": at, "mbit": mbit}], None),
        ("link_down for good", [{"kind": "link_down", "node": "n2", "at_step": at}], None),
        ("link_down 5 s", [{"kind": "link_down", "node": "n2", "at_step": at, "duration_s": 5}], None),
        ("partition 5 s", [{"kind": "partition", "node": "n2", "at_step": at, "duration_s": 5}], None),
        ("control link cut 3x timeout", [{"kind": "coordinator_unreachable", "node": "n2", "at_step": at,
                                          "duration_s": 3 * HEARTBEAT_TIMEOUT_S}], None),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="hyrun-netbench-") as tmp:
        for name, faults, health in scenarios:
            outcome, fired = run(job(Path(tmp) / "runs", args.steps, faults, health))
            rows.append(row(name, outcome, fired, at))
            print(f"  done: {name}: {outcome.state.lower()} in {outcome.wall_time_s:.0f} s", flush=True)

    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n4 nodes x 1 card in namespaces, fault at step {at} of {args.steps}, cap {mbit:g} Mbit/s; tokens/s")
    print(f"{'fault':<36} {'state':<10} {'detected':>9} {'before':>7} {'during':>7} {'after':>7} {'lost':>5}  verdicts")
    for r in rows:
        detected = "-" if r["detected_s"] is None else f"{r['detected_s']:.2f} s"
        print(f"{r['fault']:<36} {r['state']:<10} {detected:>9} {fmt(r['before'], '7.0f'):>7} "
              f"{fmt(r['during'], '7.0f'):>7} {fmt(r['after'], '7.0f'):>7} {r['steps_lost']:>5}  {r['verdicts']}")
    for r in rows:
        print(f"  {r['fault']}: {r['evidence']}")
    # The baseline never recovers: its "during" spans every step from the fault to the end.
    capped, drained = rows[0]["during"], rows[1]
    if capped and drained["after"]:
        print(f"\ncapped link: tokens/s after the drain {drained['after']:.0f} vs capped, not replanned "
              f"{capped:.0f}: {drained['after'] / capped:.2f}x (goal >= 1.3x)")


if __name__ == "__main__":
    main()
