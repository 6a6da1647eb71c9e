"""Settings of the checkpointer: one frozen dataclass, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckpointSettings:
    """How often and where a job checkpoints.

    `directory` must be visible to every rank under the same path (a shared file system on
    several nodes): DCP has every rank write its own files into one checkpoint folder.
    """

    directory: Path
    # A checkpoint is due when either interval has passed since the last one; 0 turns one off.
    interval_steps: int = 0
    interval_s: float = 0.0
    # Committed checkpoints kept on disk; 2 or more lets resume fall back past a damaged one.
    keep_last: int = 3
    # Upper bound on one collective of the commit protocol. It must cover the slowest rank's
    # write + hash of its files, or a slow rank reads as a failed save.
    commit_timeout_s: float = 600.0
    # Files per rank, written and hashed in parallel (DCP's thread_count). More helps where cores
    # are spare (a GPU node); on a small CPU host the threads compete with training.
    io_threads: int = 1
    # How much to lower the priority (raise the nice value) of the thread that serializes, hashes and
    # writes a save, so it takes the cores training leaves idle instead of preempting the trainer's
    # threads; 0 keeps the trainer's priority (a host with cores to spare, or a deadline to meet). Too
    # nice (10) and on a shared host every other process starves it (benchmarks/checkpoint_stall.py).
    writer_nice: int = 3
    # Where each rank's host snapshot lives; tmpfs so that it outlives the worker process.
    shared_memory_dir: Path = Path("/dev/shm")

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "shared_memory_dir", Path(self.shared_memory_dir))
        if self.interval_steps < 0:
            raise ValueError(f"interval_steps must be >= 0 (0 = off), got {self.interval_steps}")
        if self.interval_s < 0:
            raise ValueError(f"interval_s must be >= 0 (0 = off), got {self.interval_s}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"writer_nice must be within 0..19, got {self.writer_nice}")
        if self.commit_timeout_s <= 0:
            raise ValueError(f"commit_timeout_s must be > 0, got {self.commit_timeout_s}")
