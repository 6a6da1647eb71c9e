"""Training tokens/s with the evaluation beside training on vs off (goal: at most 10% slower on this
2-core box, where the evaluation shares the cores; on a cluster it gets its own card). The same job,
a checkpoint every few steps, is launched with `data.validation.every_checkpoint` off and on,
alternating, so load drifts hit both alike; tokens/s is measured from when the launcher heard of each
step, after the first few (start-up excluded). The medians per mode and their ratio are printed last.

    python benchmarks/eval_overhead.py [--rounds 2] [--steps 30] [--interval 3] [--cards 2]
"""

from __future__ import annotations

import argparse
import email
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from hyrun.runtime.data.prepare import PrepareSettings, prepare
from hyrun.runtime.data.sources import SourceSpec

WARMUP_STEPS = 3
GLOBAL_BATCH, SEQ_LEN = 8, 64


def job_file(tmp: Path, corpus: Path, args: argparse.Namespace, evaluate: bool, name: str) -> Path:
    job = {
        "name": name,
        "cluster": {"nodes": [{"name": "n", "cards": [{"type": "cpu-sim", "count": args.cards}]}]},
        "model": {"preset": "tiny", "overrides": {"vocab_size": 512}},
        "parallelism": {"tp": 1, "pp": 1, "cp": 1, "ep": 1},
        "training": {"steps": args.steps, "global_batch": GLOBAL_BATCH, "micro_batch": 2, "seq_len": SEQ_LEN,
                     "schedule": {"warmup_steps": 1}},
        "checkpoint": {"interval_steps": args.interval, "keep_last": args.steps},
        "data": {"path": str(corpus), "validation": {"samples_per_source": 8, "every_checkpoint": evaluate}},
        "runtime": {"run_dir": str(tmp / "runs")},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def tokens_per_s(summary: dict) -> float:
    """From the launcher's time of each step, past the warm-up steps."""
    done = {int(step): t for step, t in summary["step_done_s"].items()}
    first, last = WARMUP_STEPS, max(done)
    return (last - first) * GLOBAL_BATCH * SEQ_LEN / (done[last] - done[first])


def launch(path: Path, runs: Path) -> dict:
    before = set(runs.glob("*")) if runs.exists() else set()
    subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "launch", str(path), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ))
    (run,) = set(runs.glob("*")) - before
    return json.loads((run / "summary.json").read_text()) | {"evaluations": len(
        (run / "eval.jsonl").read_text().splitlines()) if (run / "eval.jsonl").exists() else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=3, help="steps between checkpoints")
    parser.add_argument("--cards", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus"
        prepare(PrepareSettings(out=corpus, sources=(SourceSpec("email", Path(email.__file__).parent),
                                                     SourceSpec("json", Path(json.__file__).parent)),
                                globs=("*.py",), train_vocab=512, workers=1))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for evaluate in (False, True):
                name = f"eval-{'on' if evaluate else 'off'}-{round_}"
                summary = launch(job_file(tmp, corpus, args, evaluate, name), tmp / "runs")
                rates[evaluate].append(tokens_per_s(summary))
                print(f"  {name}: {rates[evaluate][-1]:,.0f} tokens/s"
                      + (f", {summary['evaluations']} checkpoints scored beside it" if evaluate else ""), flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"{args.cards} cards, {args.steps} steps, a checkpoint every {args.interval}; medians of {args.rounds} runs each")
    print(f"  eval off {off:,.0f} tokens/s, eval on {on:,.0f} tokens/s: on/off = {on / off:.2f} "
          f"({100 * (1 - on / off):.1f}% slower; goal <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
