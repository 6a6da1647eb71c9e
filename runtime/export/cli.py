"""`hyrun export CHECKPOINT --out DIR`: the command-line shell over `write.export_checkpoint`. torch is
imported only when the command runs, so `hyrun --help` stays fast."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r}: give a size such as 2GiB, 500MB or 1048576")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def export(
    checkpoint: Annotated[Path, typer.Argument(help="a step-* checkpoint folder, a checkpoint directory (its newest "
                                                    "committed step) or a run directory runs/JOB")],
    out: Annotated[Path, typer.Option("--out", help="directory to write (must not exist, or be empty)")],
    dtype: Annotated[str, typer.Option(help="weights' dtype: bf16 or fp32 (the router stays fp32)")] = "bf16",
    job: Annotated[Optional[Path], typer.Option(help="the job file, for a checkpoint that does not record its "
                                                     "model", exists=True, dir_okay=False)] = None,
    training_state: Annotated[bool, typer.Option("--training-state", help="also write the optimizer state, step "
                                                 "and data position, so `model.init_training_state` continues "
                                                 "this run exactly")] = False,
    max_shard_size: Annotated[str, typer.Option(help="largest safetensors file (memory holds about one)")] = "2GiB",
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
) -> None:
    """Write a committed checkpoint, whatever layout saved it, as a Hugging Face hunyuan_v1_moe directory:
    sharded safetensors, config.json and an index with a SHA-256 per file. `transformers` loads it with
    HunYuanMoEV1ForCausalLM; a job starts from it with `model.init_from: DIR`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from hyrun.runtime.jobfile import JobFileError, load_job
    from hyrun.runtime.export.hf_layout import UnsupportedModel
    from hyrun.runtime.export.source import CheckpointNotFound, CheckpointTensors, find_checkpoint
    from hyrun.runtime.export.write import DTYPES, export_bytes, export_checkpoint

    err = Console(stderr=True)

    def fail(message: str, code: int = 2) -> None:
        err.print(f"[bold red]error:[/] {message}", highlight=False)
        raise typer.Exit(code)

    if dtype not in DTYPES:
        fail(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    try:
        fallback = load_job(job).model.config() if job is not None else None
        source = CheckpointTensors(find_checkpoint(checkpoint))
        config = source.model_config(fallback)
        total = export_bytes(config, dtype, training_state=training_state)
    except (CheckpointNotFound, JobFileError, UnsupportedModel) as e:
        fail(str(e))
    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"export {source.label}", total=total)
        try:
            result = export_checkpoint(source, config, out, dtype=dtype, max_shard_bytes=shard_bytes,
                                       training_state=training_state, replace=force,
                                       progress=lambda n: bar.advance(task, n))
        except (FileExistsError, ValueError, UnsupportedModel) as e:
            fail(str(e))
    print(f"exported {source.label} (step {source.ref.step}) to {result.directory}: {result.files} files, "
          f"{result.total_bytes / 2**20:.1f} MiB, {dtype}" + (", with training state" if training_state else ""))
    for difference in result.differences:
        print(f"note: transformers' HunYuanMoEV1ForCausalLM differs here: {difference}")
