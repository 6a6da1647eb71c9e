"""The Checkpointer: what the worker's training loop calls. It decides when a save is due (the same
answer on every rank), stages the state into the shared-memory snapshot, hands it to the background
writer, and reports how saves went. Mechanism lives in the modules it calls."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import commit, resume
from .group import PendingMax, RankGroup
from hyrun.runtime.tensors import local_part

from .layout import StateLayout, fingerprint_of, flatten_state, plan_layout
from .resume import ResumeInfo
from .rng import capture_rng_state
from .settings import CheckpointSettings
from .snapshot import SharedSnapshot, snapshot_path
from .state import live_state
from .staging import StagingCopy, staged_state_dict
from .storage import CheckpointStorage, LocalDirectoryStorage, step_name
from .writer import BackgroundWriter

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MIN_META_CAPACITY_BYTES = 1 << 20


@dataclass(frozen=True)
class CheckpointStatus:
    """What the worker reports about checkpoints with every step."""

    last_committed_step: int | None
    saves_committed: int
    saves_failed: int
    last_error: str | None  # of the most recent save; None once a later save committed
    last_stall_s: float  # training time the last save cost (save_async + fence)
    total_stall_s: float
    last_persist_s: float | None  # staging done -> committed, of the last committed save
    in_flight: bool


class Checkpointer:
    def __init__(
        self,
        settings: CheckpointSettings,
        *,
        rank: int,
        world_size: int,
        job_id: str,
        layout: Mapping[str, Any] | None = None,
        storage: CheckpointStorage | None = None,
    ) -> None:
        """Collective when world_size > 1 (it creates the checkpointer's own gloo groups): every rank
        constructs it at the same point, after torch.distributed is initialized."""
        if not _JOB_ID.match(job_id):
            raise ValueError(
                f"job_id {job_id!r} must be letters, digits, '_', '.', '-' (it names a /dev/shm file)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if world_size > 1:
            if not dist.is_initialized():
                raise ValueError(f"world_size {world_size} needs torch.distributed initialized first")
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise ValueError(
                    f"rank/world_size {rank}/{world_size} disagree with torch.distributed's "
                    f"{dist.get_rank()}/{dist.get_world_size()}"
                )
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.job_id = job_id
        self._layout = json.loads(json.dumps(dict(layout or {})))
        self._storage = (
            storage if storage is not None else LocalDirectoryStorage(settings.directory, settings.io_threads)
        )
        # Two groups: the writer thread's commit protocol and the trainer thread's due-vote never
        # share one (see group.py).
        self._commit_group = RankGroup.create(rank, world_size, settings.commit_timeout_s)
        self._vote_group = RankGroup.create(rank, world_size, settings.commit_timeout_s)
        self._writer = BackgroundWriter(f"hyrun-checkpoint-rank{rank}", persist_nice=settings.writer_nice)
        self._snapshot_file = snapshot_path(settings.shared_memory_dir, job_id, rank)
        self._snapshot: SharedSnapshot | None = None
        self._views: tuple[str, list[torch.Tensor]] | None = None
        self._copy_stream: "torch.cuda.Stream | None" = None
        self._staging: StagingCopy | None = None
        # Schedule: identical on every rank (last_saved_step moves only in save_async/load_latest).
        self._last_saved_step = 0
        self._interval_start_s: float | None = None
        self._requested = threading.Event()
        self._pending_vote: PendingMax | None = None
        # Status, written by the writer thread.
        self._lock = threading.Lock()
        self._last_committed_step: int | None = None
        self._saves_committed = 0
        self._saves_failed = 0
        self._last_error: str | None = None
        self._last_stall_s = 0.0
        self._total_stall_s = 0.0
        self._last_persist_s: float | None = None
        self._snapshot_step: int | None = None

    # ---- the training loop's calls -------------------------------------------------------------

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> ResumeInfo | None:
        """Collective. Loads the newest intact state (RAM snapshot or committed checkpoint) onto this
        model and optimizer, whatever mesh saved it, and restores this rank's RNG. None: nothing saved
        yet, start fresh (the optimizer is left untouched). Raises CheckpointsUnusable if states exist
        but every one is refused."""
        self._writer.wait_idle()
        info = resume.load_latest(
            model,
            optimizer,
            storage=self._storage,
            group=self._commit_group,
            snapshot_file=self._snapshot_file,
            job_id=self.job_id,
            io_threads=self.settings.io_threads,
        )
        if info is None:
            return None
        self._last_saved_step = info.step
        if info.on_disk:
            with self._lock:
                self._last_committed_step = info.step
        else:
            # The snapshot in RAM is newer than any checkpoint on disk: write it out now, or a
            # second failure would lose it.
            self._persist_snapshot_in_ram(info, model, optimizer)
        return info

    def due(self, step: int, now_s: float) -> bool:
        """Whether to save after this step. Call it once per step on every rank: it returns the same
        answer on all of them. Step intervals are exact; time intervals and request_now() are agreed
        by a max-vote started one step earlier, so the vote's latency hides behind a step."""
        if self._interval_start_s is None:
            self._interval_start_s = now_s
        by_steps = (
            self.settings.interval_steps > 0 and step - self._last_saved_step >= self.settings.interval_steps
        )
        if self._vote_group.distributed:
            wish_any, busy_any = self._pending_vote.result() if self._pending_vote is not None else (0, 0)
        else:
            wish_any, busy_any = int(self._wish(now_s)), int(self._writer.busy)
        # A time- or request-triggered save waits for a free writer instead of stalling the step.
        decided = by_steps or (wish_any == 1 and busy_any == 0)
        if decided:
            self._interval_start_s = now_s
            self._requested.clear()
        if self._vote_group.distributed:
            self._pending_vote = self._vote_group.start_max([int(self._wish(now_s)), int(self._writer.busy)])
        return decided

    def request_now(self) -> None:
        """Checkpoint as soon as every rank has heard (the coordinator's "checkpoint now"). Safe to
        call from any thread; a few steps later due() returns True on every rank."""
        self._requested.set()

    def save_async(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Collective (call it on every rank when due() said so). Starts the copy into host memory and
        returns; the writer thread then persists and commits. `extra` is job-wide JSON state (LR
        schedule, expert-LR statistics, data position) returned by load_latest as ResumeInfo.extra.
        An I/O failure is reported in status(), never raised."""
        start_s = time.perf_counter()
        extra_json = _as_json(extra)
        self.fence()
        if self._writer.busy:
            log.warning(
                "rank %d: save at step %d waits for the previous save to commit; the interval is "
                "shorter than a save takes",
                self.rank,
                step,
            )
            self._writer.wait_idle()
        self._last_saved_step = step
        rng = capture_rng_state()  # at the step boundary, on the trainer's thread
        try:
            staging, staged, snapshot = self._stage(step, model, optimizer, extra_json, rng)
            staging_error = None
        except Exception as exc:  # e.g. /dev/shm too small: reported like any failed save
            staging, staged, snapshot = None, {}, None
            staging_error = f"staging failed: {commit.describe_error(exc)}"
            log.error("rank %d: %s", self.rank, staging_error)

        def stage() -> None:
            if staging is not None:
                try:
                    staging.copy_in_background()
                except Exception as exc:
                    staging.error = f"staging failed: {commit.describe_error(exc)}"

        def persist() -> None:
            error = staging_error
            if staging is not None:
                staging.wait_copied()
                error = staging.error
            if error is None:
                snapshot.mark_committed()
                self._snapshot_step = step
            request = commit.SaveRequest(step, staged, error, extra_json, rng, self._layout, self.job_id)
            self._persist(request)

        self._staging = staging
        self._writer.submit(stage, persist)
        self._add_stall(time.perf_counter() - start_s, new_save=True)

    def fence(self) -> None:
        """Call before every optimizer.step(): returns once the last save's copy of the parameters
        and optimizer state is done (at once if it already is, or no save is in flight)."""
        if self._staging is None:
            return
        start_s = time.perf_counter()
        self._writer.wait_staged()
        self._staging.fence()
        self._staging = None
        self._add_stall(time.perf_counter() - start_s, new_save=False)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the save in flight has committed or failed (see status()); False on timeout."""
        return self._writer.wait_idle(timeout_s)

    def status(self) -> CheckpointStatus:
        with self._lock:
            return CheckpointStatus(
                self._last_committed_step,
                self._saves_committed,
                self._saves_failed,
                self._last_error,
                self._last_stall_s,
                self._total_stall_s,
                self._last_persist_s,
                self._writer.busy,
            )

    def close(self) -> None:
        """Waits for the save in flight, then releases the writer and the snapshot mapping. Raises
        nothing. The snapshot file stays in /dev/shm unless it is already committed to disk."""
        try:
            if self._pending_vote is not None:
                self._pending_vote.result()  # every rank started it; leave no collective half done
                self._pending_vote = None
            self.fence()
            if not self._writer.close(self.settings.commit_timeout_s):
                log.error(
                    "rank %d: checkpoint writer still busy after %.0f s",
                    self.rank,
                    self.settings.commit_timeout_s,
                )
            if self._snapshot is not None:
                self._views = None
                self._snapshot.close()
                durable = (
                    self._snapshot_step is not None
                    and self._snapshot_step == self.status().last_committed_step
                )
                if durable:
                    self._snapshot.unlink()
                else:
                    log.warning(
                        "rank %d: kept %s, it holds state newer than the last checkpoint",
                        self.rank,
                        self._snapshot_file,
                    )
                self._snapshot = None
        except Exception:
            log.exception("rank %d: checkpointer close failed", self.rank)

    # ---- internals -------------------------------------------------------------------------------

    def _wish(self, now_s: float) -> bool:
        by_time = self.settings.interval_s > 0 and now_s - self._interval_start_s >= self.settings.interval_s
        return by_time or self._requested.is_set()

    def _stage(self, step, model, optimizer, extra_json, rng):
        live = live_state(model, optimizer).saved
        tensors, others = flatten_state(live)
        layout = plan_layout(tensors)
        sources = [local_part(tensor) for _, tensor in tensors]
        on_gpu = next((s.device for s in sources if s.device.type == "cuda"), None)
        meta = SharedSnapshot.describe(
            {
                "job_id": self.job_id,
                "rank": self.rank,
                "world_size": self.world_size,
                "fingerprint": layout.fingerprint,
                "model_fingerprint": fingerprint_of([(p, t) for p, t in tensors if p[0] == "model"]),
                "others": others,
                "extra": extra_json,
                "rng": rng,
            }
        )
        snapshot, views = self._snapshot_for(layout, len(meta), pin=on_gpu is not None)
        snapshot.begin(step, meta)
        if on_gpu is not None and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(on_gpu)
        buffer_ptrs = {buffer.data_ptr() for buffer in model.buffers() if buffer.numel() > 0}
        at_once = [source.numel() > 0 and source.data_ptr() in buffer_ptrs for source in sources]
        staging = StagingCopy(sources, views, at_once, self._copy_stream if on_gpu is not None else None)
        staging.copy_at_once()
        staged = staged_state_dict(live, [path for path, _ in tensors], views, others)
        return staging, staged, snapshot

    def _snapshot_for(
        self, layout: StateLayout, meta_nbytes: int, *, pin: bool
    ) -> tuple[SharedSnapshot, list[torch.Tensor]]:
        """The host buffer, allocated once at the exact size of the state and reused by every save;
        reallocated only if the layout changes."""
        if self._snapshot is None:
            self._snapshot = SharedSnapshot.open_existing(self._snapshot_file)
        if self._snapshot is not None and not self._snapshot.fits(meta_nbytes, layout.data_nbytes):
            self._views = None
            self._snapshot.close()
            self._snapshot.unlink()
            self._snapshot = None
        if self._snapshot is None:
            capacity = max(_MIN_META_CAPACITY_BYTES, 2 * meta_nbytes)
            self._snapshot = SharedSnapshot.create(self._snapshot_file, capacity, layout.data_nbytes)
            log.info(
                "rank %d: snapshot %s, %d bytes", self.rank, self._snapshot_file, self._snapshot.total_bytes
            )
        if pin:
            self._snapshot.pin()
        if self._views is None or self._views[0] != layout.fingerprint:
            self._views = (layout.fingerprint, self._snapshot.views(layout))
        return self._snapshot, self._views[1]

    def _persist_snapshot_in_ram(self, info: ResumeInfo, model, optimizer) -> None:
        snapshot = SharedSnapshot.open_existing(self._snapshot_file)
        meta = snapshot.read_meta()
        live = live_state(model, optimizer).saved
        tensors, _ = flatten_state(live)
        layout = plan_layout(tensors)
        views = snapshot.views(layout)
        self._snapshot, self._views, self._snapshot_step = snapshot, (layout.fingerprint, views), info.step
        staged = staged_state_dict(live, [path for path, _ in tensors], views, meta["others"])
        request = commit.SaveRequest(
            info.step, staged, None, meta["extra"], meta["rng"], self._layout, self.job_id
        )
        self._writer.submit(lambda: None, lambda: self._persist(request))

    def _persist(self, request: commit.SaveRequest) -> None:
        """On the writer thread. Whatever happens, it ends in _record: a save never raises into training."""
        try:
            outcome = commit.persist(
                request,
                self._storage,
                self._commit_group,
                keep_last=self.settings.keep_last,
            )
        except Exception as exc:  # a bug, not an I/O failure: keep its traceback in the log
            log.exception("rank %d: checkpoint %s: internal error", self.rank, step_name(request.step))
            outcome = commit.SaveOutcome(
                request.step, False, f"internal error: {commit.describe_error(exc)}", 0.0
            )
        self._record(outcome)

    def _record(self, outcome: commit.SaveOutcome) -> None:
        with self._lock:
            if outcome.committed:
                self._last_committed_step = outcome.step
                self._saves_committed += 1
                self._last_error = None
                self._last_persist_s = outcome.persist_s
            else:
                self._saves_failed += 1
                self._last_error = f"{step_name(outcome.step)}: {outcome.error}"
        if outcome.committed:
            if self.rank == 0:
                log.info(
                    "committed %s in %.2f s%s",
                    step_name(outcome.step),
                    outcome.persist_s,
                    f", deleted {[step_name(s) for s in outcome.pruned_steps]}"
                    if outcome.pruned_steps
                    else "",
                )
        else:
            log.error(
                "rank %d: checkpoint %s failed, training goes on from the previous one: %s",
                self.rank,
                step_name(outcome.step),
                outcome.error,
            )

    def _add_stall(self, stall_s: float, *, new_save: bool) -> None:
        with self._lock:
            self._last_stall_s = stall_s if new_save else self._last_stall_s + stall_s
            self._total_stall_s += stall_s


def _as_json(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A private JSON copy of `extra`, taken now: later changes by the trainer do not leak into the
    save. Not JSON-able is a programming error and raises at once."""
    try:
        return json.loads(json.dumps(dict(extra or {})))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serializable (numbers, strings, lists, dicts): {exc}") from exc
