"""Hash while writing: a DCP FileSystemWriter whose files are SHA-256'd as their bytes go out, so the
manifest's hashes cost no second read of the checkpoint (and torch.save's own CRC-32, which the SHA-256
makes redundant, is skipped).

DCP writes every file through its file system's `create_stream` (tensor files, and `.metadata.tmp`,
renamed to `.metadata` when done); ours wraps each stream so that every `write` also feeds a digest,
and records the size and digest when the stream closes. Each record is checked against the file's
size on disk after DCP's fsync: a file that is shorter or longer than what went through the stream
(a torn write, another writer) has no entry, and the commit refuses a checkpoint with a file
unaccounted for. Resume still re-hashes what it loads, against these recorded digests.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.utils.serialization import config as serialization_config

from .manifest import FileEntry


# Every this many bytes, the disk is asked to start writing what came before (see _start_writeback).
WRITEBACK_CHUNK_BYTES = 64 << 20


class _HashingStream(io.RawIOBase):
    """A write-only, sequential file stream that feeds every byte it writes into a SHA-256, and starts
    the disk writing each chunk as soon as it is written, so the fsync at the end has little left to
    wait for: the disk works while the next chunk is serialized and hashed."""

    def __init__(self, raw: io.BufferedWriter) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size_bytes = 0
        self._unflushed_from = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        written = self._raw.write(view)  # a BufferedWriter writes all of it or raises
        if written != len(view):
            raise OSError(f"short write: {written} of {len(view)} bytes")
        self._digest.update(view)  # hashlib drops the GIL on large buffers
        self.size_bytes += len(view)
        if self.size_bytes - self._unflushed_from >= WRITEBACK_CHUNK_BYTES:
            self._start_writeback()
        return len(view)

    def _start_writeback(self) -> None:
        # POSIX_FADV_DONTNEED on Linux starts writeback of the range's dirty pages without waiting
        # for it (and drops pages already clean); durability still comes from DCP's fsync.
        self._raw.flush()
        if hasattr(os, "posix_fadvise"):
            length = self.size_bytes - self._unflushed_from
            os.posix_fadvise(self._raw.fileno(), self._unflushed_from, length, os.POSIX_FADV_DONTNEED)
        self._unflushed_from = self.size_bytes

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return False  # a seek back would make the digest wrong: refuse it rather than hash the wrong bytes

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def sha256(self) -> str:
        return self._digest.hexdigest()


class HashingFileSystem(FileSystem):
    """DCP's local file system, recording size and SHA-256 of every file written through it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()  # DCP's I/O threads write files concurrently
        self._entries: dict[str, FileEntry] = {}
        self.torn: list[str] = []  # read once the writer is done

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "r" in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        if mode != "wb":
            raise ValueError(f"{path}: hashing streams are write-only from the start ('wb'), not {mode!r}")
        path = Path(path)
        with path.open("wb") as raw:
            stream = _HashingStream(raw)
            yield stream
            raw.flush()  # DCP fsyncs before this: the data is on disk
            entry = FileEntry(stream.size_bytes, stream.sha256())
        on_disk_bytes = path.stat().st_size
        with self._lock:
            if on_disk_bytes == entry.size_bytes:
                self._entries[path.name] = entry
            else:
                self.torn.append(f"{path.name}: {on_disk_bytes} bytes on disk, {entry.size_bytes} written")

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP publishes `.metadata.tmp` as `.metadata`
        with self._lock:
            entry = self._entries.pop(Path(path).name, None)
            if entry is not None:
                self._entries[Path(new_path).name] = entry

    def entries(self) -> dict[str, FileEntry]:
        with self._lock:
            return dict(self._entries)


class HashingWriter(FileSystemWriter):
    """A DCP writer into one folder (one file per I/O thread, fsynced before it reports done) that
    records the size and SHA-256 of everything it wrote."""

    def __init__(self, path: str | os.PathLike, *, io_threads: int = 1, **options) -> None:
        options = {"single_file_per_rank": True, "sync_files": True, "thread_count": io_threads} | options
        super().__init__(path, **options)
        self.fs = self.hashing = HashingFileSystem()  # DCP opens every file it writes through `fs`

    def write_data(self, plan, planner):
        # torch.save's CRC-32 of every record costs about 0.45 s per GB of CPU and checks less than the
        # SHA-256 of the whole file taken here; readers accept records without one. The switch is
        # process-wide while this save writes (a torch.save elsewhere in the worker meanwhile writes
        # no CRC either, and its file is still valid); DCP's I/O threads are joined before it returns.
        previous = serialization_config.save.compute_crc32
        serialization_config.save.compute_crc32 = False
        try:
            return super().write_data(plan, planner)
        finally:
            serialization_config.save.compute_crc32 = previous

    def written_files(self) -> dict[str, FileEntry]:
        """Size and SHA-256 of each file this writer wrote and found whole on disk, by name."""
        return self.hashing.entries()

    def torn_files(self) -> list[str]:
        """Files whose size on disk differs from what was written through them, one line each."""
        return list(self.hashing.torn)
