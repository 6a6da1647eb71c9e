"""`hyrun ckpt`: list and verify a job's checkpoints. Only committed checkpoints are shown; a save
that was killed mid-way is invisible here exactly as it is to resume."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer

from hyrun.runtime.run_dir import checkpoint_directory

from .manifest import Manifest
from .storage import LocalDirectoryStorage, step_name
from .verify import find_damage

app = typer.Typer(help="List and verify checkpoints.", no_args_is_help=True, rich_markup_mode=None)


def _storage_and_steps(directory: Path) -> tuple[LocalDirectoryStorage, list[int], Path]:
    """A job's checkpoint directory, a run directory (its `checkpoints/`), or one checkpoint folder
    (step-000000123) inside one: the storage, its committed steps, and the folder they are in."""
    if not directory.is_dir():
        typer.echo(f"error: {directory} is not a directory", err=True)
        raise typer.Exit(2)
    if directory.name.startswith("step-") and (directory / "manifest.json").is_file():
        return LocalDirectoryStorage(directory.parent), [int(directory.name.removeprefix("step-"))], directory
    directory = checkpoint_directory(directory)
    return LocalDirectoryStorage(directory), LocalDirectoryStorage(directory).committed_steps(), directory


def _nothing_committed(directory: Path) -> str:
    leftovers = sorted(p.name for p in directory.glob("step-*") if p.is_dir())
    why = f" (only {', '.join(leftovers[:3])}: saves that never committed)" if leftovers else ""
    return f"no committed checkpoints in {directory}{why}; give a checkpoint directory or a run directory (runs/JOB)"


def _size(size_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size_bytes < 1024 or unit == "GiB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    return ""


@app.command("ls")
def list_checkpoints(
    directory: Annotated[Path, typer.Argument(help="The job's checkpoint directory, or its run directory.")],
    hashes: Annotated[
        bool, typer.Option("--hash", help="Re-hash every file (slow); by default sizes only.")
    ] = False,
) -> None:
    """Committed checkpoints, oldest first: step, time, size, ranks, and whether they are intact."""
    storage, steps, folder = _storage_and_steps(directory)
    if not steps:
        typer.echo(_nothing_committed(folder))
        return
    typer.echo(f"{'checkpoint':<16} {'created':<19} {'size':>10} {'ranks':>5}  intact")
    for step in steps:
        damage = find_damage(storage, step, hash_files=hashes)
        try:
            manifest = Manifest.from_json(storage.read_manifest(step))
            created = datetime.datetime.fromtimestamp(manifest.created_unix_s).strftime("%Y-%m-%d %H:%M:%S")
            size, ranks = _size(manifest.total_size_bytes), str(manifest.world_size)
        except Exception:
            created, size, ranks = "?", "?", "?"
        verdict = ("yes" if hashes else "sizes ok") if not damage else f"NO: {damage[0]}"
        typer.echo(f"{step_name(step):<16} {created:<19} {size:>10} {ranks:>5}  {verdict}")


@app.command("verify")
def verify_checkpoints(
    directory: Annotated[Path, typer.Argument(help="A checkpoint directory, a run directory, or one step-* folder.")],
) -> None:
    """Re-hash every file of every committed checkpoint; exit 1 if any is damaged, naming the file, or
    if there was nothing to verify."""
    storage, steps, folder = _storage_and_steps(directory)
    if not steps:
        typer.echo(f"error: nothing verified: {_nothing_committed(folder)}", err=True)
        raise typer.Exit(1)
    damaged = 0
    for step in steps:
        damage = find_damage(storage, step)
        if damage:
            damaged += 1
            for line in damage:
                typer.echo(f"{step_name(step)}: DAMAGED {line}")
        else:
            typer.echo(f"{step_name(step)}: ok")
    if damaged:
        typer.echo(f"{damaged} of {len(steps)} checkpoints damaged", err=True)
        raise typer.Exit(1)
