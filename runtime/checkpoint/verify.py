"""Checks a committed checkpoint against its manifest: every file present, of the recorded size,
with the recorded SHA-256. Shared by resume (each rank checks a share) and `hyrun ckpt verify`."""

from __future__ import annotations

from .manifest import Manifest, check_file, map_in_threads, share_of_files
from .storage import CheckpointStorage


def find_damage(
    storage: CheckpointStorage,
    step: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    hash_files: bool = True,
    io_threads: int = 1,
) -> list[str]:
    """What is wrong with this rank's share of the checkpoint, one line per damaged file; [] if intact.
    With hash_files=False only presence and sizes are checked (fast, for listings)."""
    try:
        manifest = Manifest.from_json(storage.read_manifest(step))
    except Exception as exc:
        return [f"manifest.json: {exc}"] if rank == 0 else []

    def check(name: str) -> str | None:
        expected = manifest.files[name]
        if hash_files:
            return check_file(expected, lambda: storage.file_entry(step, name, committed=True), name)
        return _check_size(storage, step, name, expected.size_bytes)

    share = share_of_files(manifest.files, rank, world_size)
    return [problem for problem in map_in_threads(check, share, io_threads) if problem is not None]


def _check_size(storage: CheckpointStorage, step: int, name: str, size_bytes: int) -> str | None:
    try:
        actual = storage.file_size_bytes(step, name)
    except FileNotFoundError:
        return f"{name}: missing"
    if actual != size_bytes:
        return f"{name}: size {actual} bytes, manifest says {size_bytes}"
    return None
