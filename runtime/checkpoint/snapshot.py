"""One rank's host snapshot: a file on tmpfs (`/dev/shm/hyrun-<job>-rank<r>`) holding a header, a
pickled description, and the tensors' bytes in one flat region of exact size.

The file outlives the worker, so a worker killed after staging loses nothing: a restart on the same
node reads the snapshot from RAM. The header's state flag is written last, so a snapshot half
overwritten when its worker died reads as STAGING and is never loaded.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .layout import StateLayout, TensorSlot

log = logging.getLogger(__name__)

_MAGIC = b"HYRUNSNP"
_VERSION = 1
_HEADER = struct.Struct("<8sIIqQQQ")  # magic, version, state, step, meta capacity, meta length, data bytes
_STATE_OFFSET = 12  # byte offset of `state` in the header: flipped alone, as the last write
HEADER_BYTES = mmap.PAGESIZE
EMPTY, STAGING, COMMITTED = 0, 1, 2
# A new snapshot maps every page up front: its first staging copy should not pay a fault per 4 KiB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


@dataclass(frozen=True)
class SnapshotHeader:
    state: int
    step: int
    meta_capacity_bytes: int
    meta_nbytes: int
    data_nbytes: int


def snapshot_path(shm_dir: Path, job_id: str, rank: int) -> Path:
    return Path(shm_dir) / f"hyrun-{job_id}-rank{rank}"


def remove_snapshots(shm_dir: Path, job_id: str) -> list[Path]:
    """Frees the RAM of every rank's snapshot of a job on this node (for the agent, at job end)."""
    removed = sorted(Path(shm_dir).glob(f"hyrun-{job_id}-rank*"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


class SharedSnapshot:
    def __init__(self, path: Path, fd: int, region: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self._region = region
        self._pinned_ptr: int | None = None

    @classmethod
    def create(cls, path: Path, meta_capacity_bytes: int, data_nbytes: int) -> "SharedSnapshot":
        meta_capacity_bytes = -(-meta_capacity_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        total_bytes = HEADER_BYTES + meta_capacity_bytes + max(data_nbytes, 1)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, total_bytes)
            # Reserve the pages now: a /dev/shm too small fails here, with the sizes in the message,
            # not as a SIGBUS in the middle of a staging copy.
            try:
                os.posix_fallocate(fd, 0, total_bytes)
            except OSError as exc:
                fs = os.statvfs(path.parent)
                raise OSError(
                    exc.errno,
                    f"cannot reserve {total_bytes} bytes for the snapshot {path}: {exc.strerror}; "
                    f"{fs.f_bavail * fs.f_frsize} bytes free in {path.parent} (raise its size, e.g. "
                    "docker --shm-size)",
                ) from exc
            region = mmap.mmap(fd, total_bytes, flags=_MAP_FLAGS)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        snapshot = cls(path, fd, region)
        _HEADER.pack_into(region, 0, _MAGIC, _VERSION, EMPTY, -1, meta_capacity_bytes, 0, data_nbytes)
        return snapshot

    @classmethod
    def open_existing(cls, path: Path) -> "SharedSnapshot | None":
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                os.close(fd)
                return None
            region = mmap.mmap(fd, size)  # no MAP_POPULATE: a probe reads only the header
        except BaseException:
            os.close(fd)
            raise
        snapshot = cls(path, fd, region)
        magic, version = _HEADER.unpack_from(region, 0)[:2]
        if magic != _MAGIC or version != _VERSION:
            snapshot.close()
            return None
        return snapshot

    @property
    def total_bytes(self) -> int:
        return len(self._region)

    def header(self) -> SnapshotHeader:
        _, _, state, step, capacity, meta_nbytes, data_nbytes = _HEADER.unpack_from(self._region, 0)
        return SnapshotHeader(state, step, capacity, meta_nbytes, data_nbytes)

    def fits(self, meta_nbytes: int, data_nbytes: int) -> bool:
        header = self.header()
        return header.data_nbytes == data_nbytes and meta_nbytes <= header.meta_capacity_bytes

    def begin(self, step: int, blob: bytes) -> None:
        """Marks the snapshot as being overwritten, then stores its description (see describe())."""
        struct.pack_into("<I", self._region, _STATE_OFFSET, STAGING)
        header = self.header()
        if len(blob) > header.meta_capacity_bytes:
            raise ValueError(
                f"snapshot description of {len(blob)} bytes exceeds {header.meta_capacity_bytes}"
            )
        self._region[HEADER_BYTES : HEADER_BYTES + len(blob)] = blob
        _HEADER.pack_into(
            self._region,
            0,
            _MAGIC,
            _VERSION,
            STAGING,
            step,
            header.meta_capacity_bytes,
            len(blob),
            header.data_nbytes,
        )

    def mark_committed(self) -> None:
        struct.pack_into("<I", self._region, _STATE_OFFSET, COMMITTED)

    @staticmethod
    def describe(meta: dict[str, Any]) -> bytes:
        return pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)

    def read_meta(self) -> dict[str, Any]:
        # Unpickling is safe here: the file is created 0600, so only this user can have written it.
        header = self.header()
        return pickle.loads(self._region[HEADER_BYTES : HEADER_BYTES + header.meta_nbytes])

    def views(self, layout: StateLayout) -> list[torch.Tensor]:
        """One tensor per slot over the snapshot's bytes. torch.frombuffer gives each its own storage of
        exact size, so DCP writes it as is instead of cloning a view of a larger storage."""
        data_offset = HEADER_BYTES + self.header().meta_capacity_bytes
        return [self._view(slot, data_offset) for slot in layout.slots]

    def _view(self, slot: TensorSlot, data_offset: int) -> torch.Tensor:
        numel = slot.nbytes // slot.dtype.itemsize
        if numel == 0:
            return torch.empty(slot.shape, dtype=slot.dtype)
        flat = torch.frombuffer(
            self._region, dtype=slot.dtype, count=numel, offset=data_offset + slot.offset_bytes
        )
        return flat.view(slot.shape)

    def pin(self) -> None:
        """Page-locks the whole mapping for asynchronous device-to-host copies. cudaHostRegister on
        our own mapping, not pin_memory(): the pinned caching allocator rounds sizes up to a power of
        two, nearly doubling host memory for a large state."""
        if self._pinned_ptr is not None:
            return
        base = torch.frombuffer(self._region, dtype=torch.uint8)
        result = int(torch.cuda.cudart().cudaHostRegister(base.data_ptr(), self.total_bytes, 1))
        if result != 0:
            raise RuntimeError(f"cudaHostRegister of {self.total_bytes} bytes failed with cudaError {result}")
        self._pinned_ptr = base.data_ptr()

    def close(self) -> None:
        if self._pinned_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._pinned_ptr)
            self._pinned_ptr = None
        try:
            self._region.close()
        except BufferError:
            # Tensors over the mapping are still alive somewhere; the mapping goes with them.
            log.debug("snapshot %s: mapping still referenced, left to the garbage collector", self.path)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
