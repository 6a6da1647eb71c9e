"""The manifest that makes a checkpoint folder trustworthy: what was saved (step, layout, extra
state, every rank's RNG) and the size and SHA-256 of every file, so damage is found before loading."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MANIFEST_NAME = "manifest.json"
FORMAT = "hyrun-checkpoint/1"
_CHUNK_BYTES = 8 << 20


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of another format."""


@dataclass(frozen=True)
class FileEntry:
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    job_id: str
    world_size: int
    # The plan this generation ran (degrees, world): a resume onto other degrees is allowed (DCP
    # reshards), it is recorded so that `ls` and the logs can say what changed.
    layout: dict[str, Any]
    # Job-wide state the trainer passed in (LR schedule, expert-LR statistics, data position).
    extra: dict[str, Any]
    # Per rank, as written by rng.capture_rng_state.
    rng_by_rank: dict[int, dict[str, Any]]
    files: dict[str, FileEntry]
    created_unix_s: float = field(default_factory=time.time)

    @property
    def total_size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.files.values())

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "step": self.step,
            "job_id": self.job_id,
            "world_size": self.world_size,
            "created_unix_s": self.created_unix_s,
            "layout": self.layout,
            "extra": self.extra,
            "rng_by_rank": {str(rank): state for rank, state in sorted(self.rng_by_rank.items())},
            "files": {
                name: {"size_bytes": e.size_bytes, "sha256": e.sha256}
                for name, e in sorted(self.files.items())
            },
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise ManifestError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
            return cls(
                step=int(body["step"]),
                job_id=str(body["job_id"]),
                world_size=int(body["world_size"]),
                created_unix_s=float(body["created_unix_s"]),
                layout=dict(body["layout"]),
                extra=dict(body["extra"]),
                rng_by_rank={int(rank): state for rank, state in body["rng_by_rank"].items()},
                files={
                    name: FileEntry(int(e["size_bytes"]), str(e["sha256"]))
                    for name, e in body["files"].items()
                },
            )
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"unreadable manifest: {type(e).__name__}: {e}") from e


def hash_stream(stream: BinaryIO) -> FileEntry:
    digest = hashlib.sha256()
    size_bytes = 0
    while chunk := stream.read(_CHUNK_BYTES):
        digest.update(chunk)  # hashlib drops the GIL on large buffers: training keeps running
        size_bytes += len(chunk)
    return FileEntry(size_bytes, digest.hexdigest())


def hash_file(path: Path) -> FileEntry:
    with open(path, "rb") as stream:
        return hash_stream(stream)


def map_in_threads(function: Callable[[str], Any], names: list[str], threads: int) -> list[Any]:
    """function(name) for every name, on up to `threads` threads (hashing and reading drop the GIL)."""
    if threads <= 1 or len(names) <= 1:
        return [function(name) for name in names]
    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        return list(pool.map(function, names))


def share_of_files(names: Iterable[str], rank: int, world_size: int) -> list[str]:
    """The files one rank hashes: every rank takes an equal share, so verification of a checkpoint
    written by many ranks does not fall on rank 0 alone."""
    return sorted(names)[rank::world_size]


def check_file(expected: FileEntry, actual_of: Callable[[], FileEntry], name: str) -> str | None:
    """One damage description, or None if the file is intact."""
    try:
        actual = actual_of()
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as e:
        return f"{name}: unreadable ({e.strerror or e})"
    if actual.size_bytes != expected.size_bytes:
        return f"{name}: size {actual.size_bytes} bytes, manifest says {expected.size_bytes}"
    if actual.sha256 != expected.sha256:
        return f"{name}: sha256 {actual.sha256[:16]}..., manifest says {expected.sha256[:16]}..."
    return None
