"""Goodput (ETTR) under hard faults: the same job run fault-free and with a hard fault every
`--fault-every-s` seconds, in the same run, on an embedded 4-card cluster (2 nodes x 2 simulated cards).

Each fault is a signal sent from outside to a worker at a random second and card drawn from
`--seed`: SIGKILL (a card that dies), SIGSEGV (a crashing driver), SIGSTOP (a hung card, found by the
hang rule). hyrun names the card, evicts it and resumes from the newest checkpoint on the other three;
`--repair-after-s` later the benchmark gives the card back (`hyrun readmit`, as an operator would
after a swap), and it joins at the next checkpoint, so a long run keeps its four cards.

    python benchmarks/goodput.py [--steps 800] [--fault-every-s 120] [--repair-after-s 30] [--seed 0]

Prints both runs' wall time and tokens/s, the faults injected and detected, steps trained again, the
time lost per fault, goodput (fault-free wall / faulty wall: the same useful work) and, from the time
lost per fault, the goodput at one fault per 5 minutes (the goal: >= 0.97). Last line: that ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch  # noqa: F401  (imported before the launcher: the first import is slow, keep it out of timings)

from hyrun.common.security import TlsFiles
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.launch import JobOutcome, run_job

SIGNALS = ("SIGKILL", "SIGSEGV", "SIGSTOP")
CARDS = [("node-a", 0), ("node-a", 1), ("node-b", 0), ("node-b", 1)]


def job_dict(run_dir: Path, steps: int, faults: list[dict]) -> dict:
    return {
        "name": "goodput",
        "cluster": {"nodes": [{"name": n, "cards": [{"type": "cpu-sim", "count": 2}]} for n in ("node-a", "node-b")]},
        "model": {"preset": "tiny"},
        "training": {"steps": steps, "global_batch": 12, "micro_batch": 1, "seq_len": 16, "schedule": {"warmup_steps": 1}},
        "checkpoint": {"interval_steps": 10},
        "runtime": {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 2.0, "run_dir": str(run_dir)},
        "fault_tolerance": {"hang_timeout_s": 3.0, "failure_grace_s": 0.5, "max_generations": 1000},
        # As examples/chaos/job.yaml: noise on shared cores reads a healthy card up to ~1.6x slow for a
        # few steps; a fault-free run must not replan around it.
        "health": {"straggler_window_steps": 3, "straggler_ratio": 2.0, "straggler_drain_ratio": 6.0},
        "faults": faults,
    }


def draw_faults(seed: int, every_s: float, horizon_s: float, start_s: float) -> list[dict]:
    """One fault in each `every_s` window after start-up, at a random second of its middle half."""
    rng, faults, window = random.Random(seed), [], 0
    while start_s + (window + 1) * every_s <= horizon_s:
        at_s = start_s + window * every_s + rng.uniform(0.25, 0.75) * every_s
        node, card = rng.choice(CARDS)
        faults.append({"kind": "signal", "signal": rng.choice(SIGNALS), "node": node, "card": card, "at_s": round(at_s, 1)})
        window += 1
    return faults


class Repairs:
    """Gives each evicted card back `delay_s` after its eviction was seen (`hyrun readmit`)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.run_dir: Path | None = None
        self.seen: set[str] = set()
        self.done: list[str] = []
        self.timers: list[threading.Timer] = []

    def started(self, _address: str, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_event(self, event) -> None:
        for eviction in event.evictions:
            card = eviction.split(":")[0]
            if card not in self.seen:
                self.seen.add(card)
                timer = threading.Timer(self.delay_s, self._readmit, args=(card,))
                timer.daemon = True
                timer.start()
                self.timers.append(timer)
        current = {e.split(":")[0] for e in event.evictions}
        self.seen &= current  # a card readmitted and evicted again is repaired again

    def _readmit(self, card: str) -> None:
        node, index = card.split("/card")
        done = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "readmit", node, "--card", index,
                               "--reason", "repaired (goodput benchmark)", "--run", str(self.run_dir)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        self.done.append(f"{card}: {(done.stdout or done.stderr).strip()}")

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()


def run(job: dict, repairs: Repairs | None = None) -> JobOutcome:
    spec = parse_job(job)
    kwargs = {"on_event": repairs.on_event, "on_started": repairs.started} if repairs else {"on_event": lambda e: None}
    try:
        return run_job(spec, spec.model_dump_json(), coordinator=None, token="", tls=TlsFiles(), **kwargs)
    finally:
        if repairs is not None:
            repairs.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="steps of each run (800: about 10 min here)")
    parser.add_argument("--fault-every-s", type=float, default=120.0)
    parser.add_argument("--repair-after-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hyrun-goodput-"))
    tokens_per_step = 12 * 16

    clean = run(job_dict(tmp / "clean", args.steps, []))
    if not clean.succeeded:
        raise SystemExit(f"fault-free run failed: {clean.message}")
    first_step_s = min(clean.step_done_s.values())
    faults = draw_faults(args.seed, args.fault_every_s, 1.5 * clean.wall_time_s, start_s=first_step_s)
    repairs = Repairs(args.repair_after_s)
    faulty = run(job_dict(tmp / "faulty", args.steps, faults), repairs)
    if not faulty.succeeded:
        raise SystemExit(f"faulty run failed: {faulty.message}")

    summary = json.loads(next((tmp / "faulty").glob("*/summary.json")).read_text())
    injected = summary["injected_faults"]
    evictions = [i for i in faulty.incidents if i["verdict"] == "evict"]
    lost_s = faulty.wall_time_s - clean.wall_time_s
    per_fault_s = lost_s / max(1, len(injected))
    goodput = clean.wall_time_s / faulty.wall_time_s
    at_5_min = 1.0 - per_fault_s / 300.0
    print(f"fault-free: {clean.wall_time_s:.1f} s, {args.steps * tokens_per_step / clean.wall_time_s:.0f} tokens/s "
          f"(first step at {first_step_s:.1f} s)")
    print(f"faulty:     {faulty.wall_time_s:.1f} s, {args.steps * tokens_per_step / faulty.wall_time_s:.0f} tokens/s, "
          f"{faulty.generations} generations")
    print(f"faults: {len(injected)} injected of {len(faults)} scheduled (one per {args.fault_every_s:g} s), "
          f"{len(evictions)} evictions, {len(repairs.done)} cards given back after {args.repair_after_s:g} s")
    for fault in injected:
        print(f"  {fault['kind']} {fault['node']} at {fault['at_job_s']:.1f} s")
    print(f"steps trained again: {faulty.steps_lost}; time lost per fault: {per_fault_s:.1f} s")
    print(f"goodput at one fault per {args.fault_every_s:g} s: {goodput:.3f} of the fault-free run")
    print(f"goodput at one fault per 5 min (from the time lost per fault): {at_5_min:.3f} (goal >= 0.97)")
    print(f"runs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
