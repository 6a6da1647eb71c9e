"""The commit protocol: a checkpoint is published only if every rank voted that its part is on disk.

Runs on the writer thread, over the checkpointer's own gloo group. Every failure, on any rank and at
any phase, becomes the one error this save reports on every rank; no rank ever skips a collective
that another rank will enter, so a failed save cannot leave ranks waiting on each other.

  1. rank 0 prepares the staging area   -> vote (with each rank's staging outcome)
  2. DCP save: each rank writes its file, rank 0 the .metadata (DCP raises on all ranks alike)
  3. each rank reports the hashes of its files, taken as they were written -> vote (hashes, RNG)
  4. rank 0 writes the manifest, renames the staging area into place -> broadcast the outcome
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .group import RankGroup
from .hashing import HashingWriter
from .manifest import FileEntry, Manifest
from .storage import CheckpointStorage, step_name

log = logging.getLogger(__name__)

# What a failed save or load raises: DCP's CheckpointException derives from BaseException, not Exception.
IO_FAILURES = (Exception, CheckpointException)

# A single-process job saves with no_dist=True on purpose; DCP warns about it on every save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class SaveRequest:
    step: int
    state: dict[str, Any]  # staged: tensors over the host snapshot
    staging_error: str | None
    extra: dict[str, Any]
    rng: dict[str, Any]  # this rank's
    layout: dict[str, Any]
    job_id: str


@dataclass(frozen=True)
class SaveOutcome:
    step: int
    committed: bool
    error: str | None
    persist_s: float
    pruned_steps: tuple[int, ...] = ()


def describe_error(error: BaseException) -> str:
    if isinstance(error, CheckpointException):
        parts = [
            f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _tb) in sorted(error.failures.items())
        ]
        return "; ".join(parts) or str(error)
    return f"{type(error).__name__}: {error}"


def persist(
    request: SaveRequest, storage: CheckpointStorage, group: RankGroup, *, keep_last: int
) -> SaveOutcome:
    start_s = time.perf_counter()

    def outcome(error: str | None, pruned: tuple[int, ...] = ()) -> SaveOutcome:
        return SaveOutcome(request.step, error is None, error, time.perf_counter() - start_s, pruned)

    # 1. An empty staging area, and every rank's staging copy done; also a barrier, so no rank
    #    writes into the area before rank 0 has (re)created it.
    error = request.staging_error
    if group.rank == 0 and error is None:
        error = _attempt(functools.partial(storage.prepare, request.step))[1]
    errors = [e for e in group.all_gather_object(error) if e is not None]
    if errors:
        _discard(storage, group)
        return outcome(f"not started: {errors[0]}")

    # 2. DCP gathers every rank's write result on rank 0 and broadcasts the verdict, so when save
    #    returns (or raises) on one rank, every rank's file is durable (or the save failed everywhere).
    try:
        writer = storage.dcp_writer(request.step)
        metadata = dcp.save(
            request.state,
            storage_writer=writer,
            process_group=group.process_group,
            no_dist=not group.distributed,
        )
    except IO_FAILURES as exc:  # disk full, permission, I/O error on any rank
        _discard(storage, group)
        return outcome(f"write failed: {describe_error(exc)}")

    # 3. Every rank reports the files it wrote, hashed as their bytes went out (no second read); a
    #    file whose size on disk is not what went through its stream fails the vote.
    names = _written_names(metadata, storage, request.step)
    entries: dict[str, FileEntry] = {}
    error = None
    if isinstance(writer, HashingWriter):
        entries = {name: entry for name, entry in writer.written_files().items() if name in names}
        torn = writer.torn_files()
        error = f"torn write: {torn[0]}" if torn else None
    votes = group.all_gather_object((error, entries, request.rng))

    # 4. Rank 0 publishes; everyone learns the outcome from it.
    result: tuple[str | None, tuple[int, ...]] = (None, ())
    if group.rank == 0:
        # Guarded as a whole: rank 0 must reach the broadcast whatever happens, or every other
        # rank waits in it until the commit timeout.
        result, crash = _attempt(lambda: _publish(request, storage, votes, names, group.world_size, keep_last))
        if crash is not None:
            _discard(storage, group)
            result = (f"commit failed: {crash}", ())
    error, pruned = group.broadcast_object(result)
    return outcome(error, pruned)


def _publish(
    request: SaveRequest,
    storage: CheckpointStorage,
    votes: list[tuple[str | None, dict[str, Any], dict[str, Any]]],
    names: set[str],
    world_size: int,
    keep_last: int,
) -> tuple[str | None, tuple[int, ...]]:
    errors = [f"rank {rank}: {error}" for rank, (error, _, _) in enumerate(votes) if error is not None]
    if errors:
        storage.sweep()  # raising here is caught by the caller
        return f"write refused: {errors[0]}", ()
    files: dict[str, Any] = {}
    for _, entries, _ in votes:
        files.update(entries)
    # A file no rank hashed on its way out (a writer that does not hash, a file written around it):
    # hashed here from disk, so the manifest always covers every file DCP lists.
    for name in sorted(names - set(files)):
        files[name] = storage.file_entry(request.step, name, committed=False)
    manifest = Manifest(
        step=request.step,
        job_id=request.job_id,
        world_size=world_size,
        layout=request.layout,
        extra=request.extra,
        rng_by_rank={rank: rng for rank, (_, _, rng) in enumerate(votes)},
        files=files,
    )

    def publish() -> None:
        storage.write_manifest(request.step, manifest.to_json())
        storage.commit(request.step)

    error = _attempt(publish)[1]
    if error is not None:
        storage.sweep()
        return f"commit failed: {error}", ()
    return None, _prune(storage, keep_last)


def _prune(storage: CheckpointStorage, keep_last: int) -> tuple[int, ...]:
    """Drops the oldest committed checkpoints beyond keep_last; a failure here costs disk, not a save."""
    old_steps = storage.committed_steps()[:-keep_last]
    pruned = []
    for step in old_steps:
        error = _attempt(functools.partial(storage.delete, step))[1]
        if error is None:
            pruned.append(step)
        else:
            log.warning("could not delete old checkpoint %s: %s", step_name(step), error)
    return tuple(pruned)


def _discard(storage: CheckpointStorage, group: RankGroup) -> None:
    if group.rank == 0:
        error = _attempt(storage.sweep)[1]
        if error is not None:
            log.warning("could not remove a failed save's staging area: %s", error)


def _attempt(action: Callable[[], Any]) -> tuple[Any, str | None]:
    """Runs an I/O action: (its result, None), or (None, its failure as text) -- the one error path."""
    try:
        return action(), None
    except IO_FAILURES as exc:
        return None, describe_error(exc)


def _written_names(metadata, storage: CheckpointStorage, step: int) -> set[str]:
    """The files DCP wrote for this save. torch before 2.13 returns the plan's metadata without the
    files its FileSystemWriter recorded (seen on torch 2.11 + CUDA); they are in the `.metadata` file
    it wrote to the (shared) staging folder."""
    storage_data = getattr(metadata, "storage_data", None)
    if not storage_data:
        storage_data = storage.staged_dcp_metadata(step).storage_data
    return {info.relative_path for info in storage_data.values()} | {_DCP_METADATA}
