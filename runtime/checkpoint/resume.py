"""Resume: pick the newest state every rank can load (the shared-memory snapshot or a committed
checkpoint whose files match their manifest), load it onto the current mesh and restore RNG.

Every choice is made collectively, so all ranks load the same step or none does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from .commit import IO_FAILURES, describe_error
from .group import RankGroup
from hyrun.runtime.tensors import local_part

from .layout import fingerprint_of, flatten_state, plan_layout, rebuild_state
from .manifest import Manifest
from .rng import restore_rng_state
from .snapshot import COMMITTED, SharedSnapshot
from .state import apply_state, live_state, saved_model_state
from .storage import CheckpointStorage, step_name
from .verify import find_damage

log = logging.getLogger(__name__)

SHARED_MEMORY, DISK = "shared_memory", "disk"


class CheckpointsUnusable(RuntimeError):
    """Checkpoints exist but none can be loaded (all damaged, or none fits this model)."""


@dataclass(frozen=True)
class ResumeInfo:
    step: int  # the last completed step: training continues at step + 1
    extra: dict[str, Any]  # what save_async was given as `extra`
    source: str  # SHARED_MEMORY or DISK
    refused: tuple[str, ...]  # newer states that were skipped, and why
    rng_restored: bool
    on_disk: bool  # False: only the RAM snapshot holds this step (the checkpointer writes it out)


@dataclass(frozen=True)
class _Loaded:
    extra: dict[str, Any]
    rng_by_rank: dict[int, dict[str, Any]]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of the model's local shards; read before the optimizer is touched, because
    building an optimizer state dict initializes a fresh optimizer's state."""
    tensors, _ = flatten_state(saved_model_state(model))
    return fingerprint_of(tensors)


def probe_snapshot(path: Path, job_id: str, rank: int, world_size: int, fingerprint: str) -> tuple[int, str]:
    """(step, "") if this rank's snapshot is complete and fits this model, else (-1, why not)."""
    snapshot = SharedSnapshot.open_existing(path)
    if snapshot is None:
        return -1, "no snapshot"
    try:
        header = snapshot.header()
        if header.state != COMMITTED:
            return -1, "snapshot incomplete (its worker died while staging)"
        meta = snapshot.read_meta()
        expected = (job_id, rank, world_size, fingerprint)
        actual = (meta["job_id"], meta["rank"], meta["world_size"], meta["model_fingerprint"])
        if actual != expected:
            return -1, "snapshot of another job, rank or layout"
        return header.step, ""
    except Exception as exc:
        return -1, f"unreadable snapshot: {describe_error(exc)}"
    finally:
        snapshot.close()


def load_latest(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    storage: CheckpointStorage,
    group: RankGroup,
    snapshot_file: Path,
    job_id: str,
    io_threads: int = 1,
) -> ResumeInfo | None:
    if group.rank == 0:
        for name in storage.sweep():
            log.info("removed %s: left by a save that never committed", name)
    committed = group.broadcast_object(storage.committed_steps() if group.rank == 0 else None)
    probe = probe_snapshot(snapshot_file, job_id, group.rank, group.world_size, model_fingerprint(model))
    probes = group.all_gather_object(probe)
    steps_in_ram = {step for step, _ in probes}
    ram_step = steps_in_ram.pop() if len(steps_in_ram) == 1 and -1 not in steps_in_ram else None
    if ram_step is None and any(step >= 0 for step, _ in probes) and group.rank == 0:
        log.info("shared-memory snapshots not used: %s", sorted(set(probes)))

    candidates = [(step, DISK) for step in committed]
    if ram_step is not None:
        candidates.append((ram_step, SHARED_MEMORY))
    # Newest first; at equal steps RAM first, it is faster to read.
    candidates.sort(key=lambda c: (c[0], c[1] == SHARED_MEMORY), reverse=True)

    refused: list[str] = []
    for step, source in candidates:
        label = f"{step_name(step)} ({source.replace('_', ' ')})"
        loaded, reason = _try_load(step, source, model, optimizer, storage, group, snapshot_file, io_threads)
        if loaded is None:
            refused.append(f"{label}: {reason}")
            if group.rank == 0:
                log.warning("refused checkpoint %s: %s", label, reason)
            continue
        rng = loaded.rng_by_rank.get(group.rank)
        if rng is not None:
            restore_rng_state(rng)
        elif group.rank == 0 or len(loaded.rng_by_rank) > group.world_size:
            log.info(
                "rank %d: no saved RNG state (saved by %d ranks); RNG left as seeded",
                group.rank,
                len(loaded.rng_by_rank),
            )
        if group.rank == 0:
            log.info("resumed from %s", label)
        on_disk = source == DISK or step in committed
        return ResumeInfo(step, loaded.extra, source, tuple(refused), rng is not None, on_disk)
    if refused:
        # Starting from scratch here would train over what may be recoverable (and keep_last would
        # soon delete it); a person decides.
        raise CheckpointsUnusable(
            f"every saved state was refused, none loaded: {'; '.join(refused)}. Repair or move them "
            "away to start from scratch"
        )
    return None


def _try_load(
    step, source, model, optimizer, storage, group, snapshot_file, io_threads
) -> tuple[_Loaded | None, str]:
    if source == DISK:
        problems = group.all_gather_object(
            find_damage(storage, step, rank=group.rank, world_size=group.world_size, io_threads=io_threads)
        )
        problems = [p for share in problems for p in share]
        if problems:
            return None, "; ".join(problems)
    loaded: _Loaded | None = None
    error = None
    try:
        if source == DISK:
            loaded = _load_from_disk(step, model, optimizer, storage, group)
        else:
            loaded = _load_from_snapshot(step, model, optimizer, snapshot_file)
    except IO_FAILURES as exc:
        error = describe_error(exc)
    # DCP fails on all ranks alike; a snapshot can fail on one rank only: vote either way.
    errors = [e for e in group.all_gather_object(error) if e is not None]
    if errors:
        return None, f"load failed: {errors[0]}"
    return loaded, ""


def _load_from_disk(step, model, optimizer, storage, group) -> _Loaded:
    manifest = Manifest.from_json(storage.read_manifest(step))
    live = live_state(model, optimizer)
    # DCP reads each rank's slices of every tensor, whatever mesh wrote them: this is the resharding.
    dcp.load(
        live.saved,
        storage_reader=storage.dcp_reader(step),
        process_group=group.process_group,
        no_dist=not group.distributed,
    )
    apply_state(model, optimizer, live)
    return _Loaded(manifest.extra, manifest.rng_by_rank)


def _load_from_snapshot(step, model, optimizer, snapshot_file) -> _Loaded:
    snapshot = SharedSnapshot.open_existing(snapshot_file)
    if snapshot is None:
        raise FileNotFoundError(snapshot_file)
    try:
        meta = snapshot.read_meta()
        live = live_state(model, optimizer)
        tensors, _ = flatten_state(live.saved)
        layout = plan_layout(tensors)
        if layout.fingerprint != meta["fingerprint"] or snapshot.header().step != step:
            raise ValueError("snapshot does not match this model and optimizer")
        for (_, tensor), view in zip(tensors, snapshot.views(layout), strict=True):
            local_part(tensor).copy_(view)
        others = meta["others"]
        live.saved = rebuild_state(
            live.saved, lambda path, leaf: leaf if isinstance(leaf, torch.Tensor) else others[path]
        )
        apply_state(model, optimizer, live)
        return _Loaded(meta["extra"], {meta["rank"]: meta["rng"]})
    finally:
        snapshot.close()
