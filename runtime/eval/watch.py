"""Evaluation beside training: its own process (`python -m hyrun.runtime.eval.watch RUN_DIR JOB_FILE LAUNCHER_PID`), started
by `hyrun launch` when the job sets `data.validation.every_checkpoint`, scores each newly committed
checkpoint's held-out loss per source, appends it to RUN_DIR/eval.jsonl and sends it to the coordinator
(report.py), which exports it as metrics. It only reads committed files, at a lower CPU priority, so it
never stalls training; if it fails, the error goes into eval.jsonl and to the coordinator (counted in
hyrun_eval_failures_total) and training carries on. It ends once the job's summary.json exists and every checkpoint
committed by then has been scored."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

POLL_S = 1.0


def pending_steps(committed: list[int], scored: set[int]) -> list[int]:
    """Committed checkpoints not yet scored, newest first (an evaluation that falls behind scores the
    latest model rather than the backlog's oldest)."""
    return sorted((step for step in committed if step not in scored), reverse=True)


def watch(run_dir: Path, job_file: Path, poll_s: float = POLL_S, report: Callable[[dict], object] = lambda r: None) -> None:
    """Scores checkpoints until the job has ended; `report` gets each eval.jsonl record as it is written."""
    from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
    from hyrun.runtime.jobfile import load_job

    job = load_job(job_file)
    storage = LocalDirectoryStorage(Path(job.checkpoint.directory) if job.checkpoint.directory
                                    else run_dir / "checkpoints")
    out, scored = run_dir / "eval.jsonl", set()
    while True:
        finished = (run_dir / "summary.json").exists()  # read before the listing: nothing committed is missed
        for step in pending_steps(storage.committed_steps(), scored):
            scored.add(step)
            record = evaluate_checkpoint(job, storage.committed_path(step), step)
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            report(record)
        if finished:
            return
        time.sleep(poll_s)


def evaluate_checkpoint(job, path: Path, step: int) -> dict:
    """One eval.jsonl record: the checkpoint's held-out loss per source, or the error that stopped it."""
    started_s, record = time.monotonic(), {"step": step, "time": time.time()}
    try:
        from hyrun.runtime.eval.heldout import heldout_losses, load_checkpoint_model

        _, model = load_checkpoint_model(path, fallback=job.model.config())
        losses = heldout_losses(model, job.data.directory(), seq_len=job.training.seq_len,
                                samples_per_source=job.data.validation.samples_per_source,
                                document_mask=job.data.document_mask)
        record["sources"] = {s.source: {"loss": s.model_loss, "perplexity": s.perplexity, "tokens": s.tokens,
                                        "unigram_loss": s.unigram_loss} for s in losses}
        if job.data.validation.lm_eval_tasks:
            from hyrun.runtime.eval.lm_harness import run_tasks

            record["tasks"] = run_tasks(model, job.data.directory(), [Path(f) for f in job.data.validation.lm_eval_tasks])
    except Exception as error:  # reported, never raised: an evaluation must not end anything
        record["error"] = f"{type(error).__name__}: {error}"
    record["duration_s"] = time.monotonic() - started_s
    return record


def main() -> int:
    from hyrun.common.process import die_with_parent

    die_with_parent(int(sys.argv[3]))  # an interrupted launch writes no summary: go with it
    os.nice(10)  # training keeps the cores it needs; the evaluation takes what is left
    import torch

    torch.set_num_threads(1)
    from hyrun.runtime.eval.report import CoordinatorTarget, send_report

    target = CoordinatorTarget.from_env()
    watch(Path(sys.argv[1]), Path(sys.argv[2]),
          report=(lambda record: send_report(target, record)) if target is not None else (lambda record: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
