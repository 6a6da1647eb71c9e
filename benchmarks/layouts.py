"""What each 5D layout costs on this machine, against plain data parallelism in the same run.

The tiny model trains on 4 simulated cards with each layout in turn (`parallelism:` explicit
degrees), and the per-rank step reports are split into compute, communication wait and pipeline
bubble (what the coordinator's JobEvent carries). On a CPU testbed every collective is a gloo
round trip on loopback, so layouts that communicate inside the layer (tp, cp, ep) pay per-message
latency that GPUs with NVLink do not; this measures it instead of assuming it.

    python benchmarks/layouts.py [--steps 12]

Prints one line per layout: step time, tokens/s relative to dp=4, and where a rank's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (the first import is slow; keep it out of the timings)

from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import run_job
from hyrun.common.security import TlsFiles

WARMUP_STEPS = 3
LAYOUTS = {
    "dp=4": {"dp": 4, "tp": 1, "pp": 1, "cp": 1, "ep": 1},
    "dp=4 ep=4": {"dp": 4, "ep": 4},
    "dp=2 tp=2": {"dp": 2, "tp": 2},
    "dp=2 pp=2": {"dp": 2, "pp": 2},
    "dp=2 cp=2": {"dp": 2, "cp": 2},
    "pp=2 tp=2": {"pp": 2, "tp": 2},
}


def job_dict(run_dir: Path, steps: int, parallelism: dict) -> dict:
    return {
        "name": "layouts",
        "cluster": {"nodes": [{"name": n, "cards": [{"type": "cpu-sim", "count": 2}]} for n in ("a", "b")]},
        "model": {"preset": "tiny"},
        "training": {"steps": steps, "global_batch": 16, "micro_batch": 2, "seq_len": 64,
                     "schedule": {"warmup_steps": 2}},
        "parallelism": parallelism,
        "checkpoint": {"interval_steps": 0},
        "runtime": {"heartbeat_interval_s": 0.5, "run_dir": str(run_dir), "warm_workers": 0},
    }  # fmt: skip


def measure(job: dict) -> tuple[float, dict[str, float]]:
    """Median step time, and the median share of a rank's step in compute / comm wait / bubble."""
    spec = parse_job(job)
    step_times: list[float] = []
    parts: dict[str, list[float]] = {"compute": [], "comm wait": [], "bubble": []}

    def on_event(event) -> None:
        if event.step > WARMUP_STEPS and event.step_time_s > 0 and len(step_times) < event.step - WARMUP_STEPS:
            step_times.append(event.step_time_s)
            for rank in event.ranks:
                if rank.step_time_s > 0:
                    parts["compute"].append(rank.compute_time_s / rank.step_time_s)
                    parts["comm wait"].append(rank.comm_wait_s / rank.step_time_s)
                    parts["bubble"].append(rank.bubble_s / rank.step_time_s)

    outcome = run_job(spec, spec.model_dump_json(), coordinator=None, token="", tls=TlsFiles(), on_event=on_event)
    if not outcome.succeeded:
        raise SystemExit(f"run failed: {outcome.message}")
    return statistics.median(step_times), {k: statistics.median(v) for k, v in parts.items() if v}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="hyrun-layouts-") as tmp:
        for name, degrees in LAYOUTS.items():
            results[name] = measure(job_dict(Path(tmp), args.steps, degrees))
            print(f"measured {name}", flush=True)
    base_s = results["dp=4"][0]
    print(f"{'layout':<12} {'step ms':>8} {'tokens/s vs dp=4':>17}   share of a rank's step")
    for name, (step_s, parts) in results.items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in parts.items())
        print(f"{name:<12} {step_s * 1e3:>8.0f} {base_s / step_s:>16.2f}x   {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
