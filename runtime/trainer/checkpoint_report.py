"""What a rank's step report says about checkpoints: the stall this step paid, the newest commit's
time to durable and size, failed saves, and where the generation resumed from. The coordinator
turns these into Prometheus series (runtime/metrics.py)."""

from __future__ import annotations

import logging

log = logging.getLogger("hyrun.trainer")


class CheckpointReport:
    """Per-step checkpoint fields for StepReport, from the checkpointer's cumulative status."""

    def __init__(self, checkpointer, *, rank: int, resumed=None) -> None:
        self.checkpointer = checkpointer
        self.rank = rank
        self._stall_so_far_s = 0.0
        self._sized_step: int | None = None
        self._size_bytes = 0
        # Reported once, with the first step after the resume (the coordinator counts it once).
        self._resume = {"resume_source": resumed.source, "resume_fallbacks": len(resumed.refused)} if resumed else {}

    def fields(self) -> dict:
        if self.checkpointer is None:
            return {"checkpoint_step": -1}
        status = self.checkpointer.status()
        stall_s = max(0.0, status.total_stall_s - self._stall_so_far_s)
        self._stall_so_far_s = status.total_stall_s
        committed = status.last_committed_step
        fields = {
            "checkpoint_step": -1 if committed is None else committed,
            "checkpoint_error": status.last_error or "",
            "checkpoint_stall_s": stall_s,
            "checkpoint_persist_s": status.last_persist_s or 0.0,
            "checkpoint_failures": status.saves_failed,
            "checkpoint_bytes": self._size_of(committed) if self.rank == 0 else 0,
            **self._resume,
        }
        self._resume = {}
        return fields

    def _size_of(self, step: int | None) -> int:
        """The committed checkpoint's size from its manifest, read once per new commit (rank 0 only:
        one small file per checkpoint, never on the other ranks' steps)."""
        if step is None or step == self._sized_step:
            return self._size_bytes
        from hyrun.runtime.checkpoint.manifest import Manifest
        from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage

        self._sized_step = step
        try:
            storage = LocalDirectoryStorage(self.checkpointer.settings.directory)
            self._size_bytes = Manifest.from_json(storage.read_manifest(step)).total_size_bytes
        except Exception as error:  # a size is a metric: never a reason to stop training
            log.warning("could not read the size of checkpoint %d: %s", step, error)
            self._size_bytes = 0
        return self._size_bytes
