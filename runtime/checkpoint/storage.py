"""Where committed checkpoints live, behind a small Protocol so that a second backend (an object
store, a burst buffer) can replace the local/shared file system without touching the commit protocol.

A checkpoint is written into a staging area and published by one atomic step; only published
("committed") checkpoints are ever listed, so a writer killed mid-save leaves nothing loadable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .manifest import MANIFEST_NAME, FileEntry, hash_file

if TYPE_CHECKING:  # annotations only: listing and verifying checkpoints (`hyrun ckpt`) needs no torch
    from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

log = logging.getLogger(__name__)

_COMMITTED = re.compile(r"^step-(\d{9})$")
_LEFTOVER = re.compile(r"^step-\d{9}\.(tmp|trash)$")


class CheckpointStorage(Protocol):
    """What the commit protocol needs from a place that holds checkpoints.

    Rank 0 alone calls prepare, write_manifest, commit, delete and sweep; every rank calls the rest.
    """

    def committed_steps(self) -> list[int]:
        """Steps of published checkpoints, oldest first."""

    def prepare(self, step: int) -> None:
        """An empty staging area for `step`, replacing one left by an earlier, killed attempt."""

    def dcp_writer(self, step: int) -> StorageWriter:
        """A DCP writer into the staging area of `step`; files must be durable when it finishes. A
        HashingWriter (hashing.py) spares the commit a second read of every file to hash it."""

    def dcp_reader(self, step: int) -> StorageReader:
        """A DCP reader of the committed checkpoint `step`."""

    def staged_dcp_metadata(self, step: int):
        """DCP's own `.metadata` of save `step`, read back from its staging area."""

    def file_entry(self, step: int, name: str, *, committed: bool) -> FileEntry:
        """Size and SHA-256 of one file, staged or committed; FileNotFoundError if it is missing."""

    def file_size_bytes(self, step: int, name: str) -> int:
        """Size of one file of committed checkpoint `step`; FileNotFoundError if it is missing."""

    def write_manifest(self, step: int, data: bytes) -> None:
        """Durably writes the manifest into the staging area of `step`."""

    def read_manifest(self, step: int) -> bytes:
        """The manifest of committed checkpoint `step`."""

    def commit(self, step: int) -> None:
        """Atomically publishes the staging area of `step` (and makes that durable)."""

    def delete(self, step: int) -> None:
        """Removes committed checkpoint `step`, unpublishing it first."""

    def sweep(self) -> list[str]:
        """Removes staging areas and half-deleted checkpoints left by killed processes."""


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder: a rename or a new file is durable only once its directory entry is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDirectoryStorage:
    """Checkpoints as folders `step-000000123/` under one directory (local or shared file system);
    `step-000000123.tmp/` while being written, published by rename(2), which is atomic on POSIX."""

    def __init__(self, root: Path, io_threads: int = 1) -> None:
        self.root = Path(root)
        self.io_threads = io_threads

    def committed_path(self, step: int) -> Path:
        return self.root / step_name(step)

    def staging_path(self, step: int) -> Path:
        return self.root / f"{step_name(step)}.tmp"

    def committed_steps(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        steps = []
        for name in names:
            match = _COMMITTED.match(name)
            if match and (self.root / name / MANIFEST_NAME).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def prepare(self, step: int) -> None:
        staging = self.staging_path(step)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)

    def dcp_writer(self, step: int) -> StorageWriter:
        from .hashing import HashingWriter  # torch only where a rank writes (start-up cost)

        # io_threads files per rank, each fsynced by DCP before it reports the write done, each
        # SHA-256'd as its bytes go out.
        return HashingWriter(self.staging_path(step), io_threads=self.io_threads)

    def dcp_reader(self, step: int) -> StorageReader:
        from torch.distributed.checkpoint import FileSystemReader  # torch only where a rank reads (start-up cost)

        return FileSystemReader(self.committed_path(step))

    def staged_dcp_metadata(self, step: int):
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(self.staging_path(step)).read_metadata()

    def file_entry(self, step: int, name: str, *, committed: bool) -> FileEntry:
        folder = self.committed_path(step) if committed else self.staging_path(step)
        return hash_file(folder / name)

    def file_size_bytes(self, step: int, name: str) -> int:
        return (self.committed_path(step) / name).stat().st_size

    def write_manifest(self, step: int, data: bytes) -> None:
        staging = self.staging_path(step)
        with open(staging / MANIFEST_NAME, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        fsync_path(staging)

    def read_manifest(self, step: int) -> bytes:
        return (self.committed_path(step) / MANIFEST_NAME).read_bytes()

    def commit(self, step: int) -> None:
        final = self.committed_path(step)
        if final.exists():  # the same step saved again (a rerun in an old directory): replace it
            self._unpublish(step)
        os.rename(self.staging_path(step), final)
        fsync_path(self.root)
        self._remove_trash(step)

    def delete(self, step: int) -> None:
        self._unpublish(step)
        self._remove_trash(step)

    def sweep(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        removed = [name for name in sorted(names) if _LEFTOVER.match(name)]
        for name in removed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return removed

    def _unpublish(self, step: int) -> None:
        # Rename first, then remove: a process killed mid-delete leaves a `.trash` folder that is
        # never listed, not a published checkpoint with files missing.
        os.rename(self.committed_path(step), self.root / f"{step_name(step)}.trash")
        fsync_path(self.root)

    def _remove_trash(self, step: int) -> None:
        shutil.rmtree(self.root / f"{step_name(step)}.trash", ignore_errors=True)
