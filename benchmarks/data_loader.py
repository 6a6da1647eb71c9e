"""Data loader time per step as a fraction of step time (goal: at most 1%). One rank in this process
trains on a prepared corpus (the standard library's email and json packages, a 512-token BPE) with
the document mask on; each step times the rank's micro-batches read by global sample index
(`RealTokens.micro_batches`: what the step waits for; the reading itself, sample order, memory-mapped
windows and segment ids, runs for the next step on a background thread) against the whole step
(reading, forward, backward, optimizer). The reading's own time is printed too. Medians over the steps after the first few are printed.

    python benchmarks/data_loader.py [--steps 20] [--preset tiny] [--seq-len 64] [--micro-batches 4]
"""

from __future__ import annotations

import argparse
import email
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyrun.runtime.data.prepare import PrepareSettings, prepare
from hyrun.runtime.data.sources import SourceSpec
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, Trainer
from hyrun.runtime.trainer.reporting import Reporter

WARMUP_STEPS = 3


def job(corpus: Path, args: argparse.Namespace):
    micro_batch = 2
    return parse_job({
        "cluster": {"nodes": [{"name": "n", "cards": [{"type": "cpu-sim", "count": 1}]}]},
        "model": {"preset": args.preset, "overrides": {"vocab_size": 512, "max_seq_len": max(128, args.seq_len)}},
        "training": {"steps": args.steps, "global_batch": micro_batch * args.micro_batches, "micro_batch": micro_batch,
                     "seq_len": args.seq_len, "schedule": {"warmup_steps": 1}},
        "data": {"path": str(corpus)},
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches of 2 sequences per step")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a worker runs
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        prepare(PrepareSettings(out=corpus, sources=(SourceSpec("email", Path(email.__file__).parent),
                                                     SourceSpec("json", Path(json.__file__).parent)),
                                globs=("*.py",), train_vocab=512, workers=1))
        spec = job(corpus, args)
        trainer = Trainer(spec, RankWork(), Reporter(None))
        load_s, step_s = [], []
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            trainer.begin_step(step)
            read_started = time.perf_counter()
            batches = trainer.data.micro_batches(step, 0, trainer.micro_batches, spec.training.micro_batch)
            read_s = time.perf_counter() - read_started
            trainer.engine.forward_backward(batches, speed=1.0, observe=trainer.expert_lrs.observe)
            trainer.apply_update(step)
            if step > WARMUP_STEPS:
                load_s.append(read_s)
                step_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            trainer.data.data.rows(step, 0, spec.training.global_batch)
        read = (time.perf_counter() - started) / args.steps
    load, total = statistics.median(load_s), statistics.median(step_s)
    print(f"{args.preset}, seq_len {args.seq_len}, {args.micro_batches} micro-batches of 2 per step, document mask on, "
          f"median of {len(step_s)} steps:")
    print(f"  loader {load * 1e3:.2f} ms per step, step {total * 1e3:.1f} ms: {100 * load / total:.2f}% of the step "
          f"(goal <= 1%)")
    print(f"  reading a step's rows without the prefetch: {read * 1e3:.2f} ms ({100 * read / total:.2f}% of the step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
