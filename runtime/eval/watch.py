"""Evaluation beside training: its own process (`python -m hyrun.runtime.eval.watch RUN_DIR JOB_FILE LAUNCHER_PID`), started
by `hyrun launch` when the job sets `data.validation.every_checkpoint`, scores each newly committed
checkpoint's held-out loss per source and appends it to RUN_DIR/eval.jsonl. It only reads committed
files, at a lower CPU priority, so it never stalls training; if it fails, the error goes into
eval.jsonl and training carries on. It ends once the job's summary.json exists and every checkpoint
committed by then has been scored."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

POLL_S = 1.0


def pending_steps(committed: list[int], scored: set[int]) -> list[int]:
    """Committed checkpoints not yet scored, newest first (an evaluation that falls behind scores the
    latest model rather than the backlog's oldest)."""
    return sorted((step for step in committed if step not in scored), reverse=True)


def watch(run_dir: Path, job_file: Path, poll_s: float = POLL_S) -> None:
    from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
    from hyrun.runtime.eval.heldout import heldout_losses, load_checkpoint_model
    from hyrun.runtime.jobfile import load_job

    job = load_job(job_file)
    storage = LocalDirectoryStorage(Path(job.checkpoint.directory) if job.checkpoint.directory
                                    else run_dir / "checkpoints")
    out, scored = run_dir / "eval.jsonl", set()
    while True:
        finished = (run_dir / "summary.json").exists()  # read before the listing: nothing committed is missed
        for step in pending_steps(storage.committed_steps(), scored):
            scored.add(step)
            record: dict = {"step": step, "time": time.time()}
            try:
                _, model = load_checkpoint_model(storage.committed_path(step), fallback=job.model.config())
                losses = heldout_losses(model, job.data.directory(), seq_len=job.training.seq_len,
                                        samples_per_source=job.data.validation.samples_per_source,
                                        document_mask=job.data.document_mask)
                record["sources"] = {s.source: {"loss": s.model_loss, "perplexity": s.perplexity,
                                                "unigram_loss": s.unigram_loss} for s in losses}
            except Exception as error:  # reported, never raised: an evaluation must not end anything
                record["error"] = f"{type(error).__name__}: {error}"
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
        if finished:
            return
        time.sleep(poll_s)


def main() -> int:
    from hyrun.common.process import die_with_parent

    die_with_parent(int(sys.argv[3]))  # an interrupted launch writes no summary: go with it
    os.nice(10)  # training keeps the cores it needs; the evaluation takes what is left
    import torch

    torch.set_num_threads(1)
    watch(Path(sys.argv[1]), Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
