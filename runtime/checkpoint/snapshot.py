"""One rank's host snapshot: a file on tmpfs (`/dev/shm/hyrun-<job>-rank<r>`) holding a header, a
JSON description, and the tensors' bytes in one flat region of exact size.

The file outlives the worker, so a worker killed after staging loses nothing: a restart on the same
node reads the snapshot from RAM. The header's state flag is written last, so a snapshot half
overwritten when its worker died reads as STAGING and is never loaded.

/dev/shm is writable by every local user, so the file is never trusted blindly: it is created with
O_EXCL (a file another user planted at our path is never opened for writing; this rank then stages
into a private, unlinked file and relies on disk checkpoints), a file is loaded only if it is a
regular file owned by this process's user with no group or other permission bits, and its description
is data only (JSON, validated as a SnapshotMeta on read: never pickle). Anything else is logged and
treated as "no snapshot": resume falls back to the checkpoints on disk.
"""

from __future__ import annotations

import base64
import json
import logging
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from hyrun.common.snapshots import snapshot_path  # noqa: F401  (the one naming rule; callers import it from here)

from .layout import StateLayout, TensorSlot

log = logging.getLogger(__name__)

_MAGIC = b"HYRUNSNP"
_VERSION = 2  # 2: JSON description (1 was pickled, and is never read)
_HEADER = struct.Struct("<8sIIqQQQ")  # magic, version, state, step, meta capacity, meta length, data bytes
_STATE_OFFSET = 12  # byte offset of `state` in the header: flipped alone, as the last write
HEADER_BYTES = mmap.PAGESIZE
EMPTY, STAGING, COMMITTED = 0, 1, 2
# A new snapshot maps every page up front: its first staging copy should not pay a fault per 4 KiB.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class SnapshotUnusable(ValueError):
    """A snapshot description that must not be loaded: not our encoding, or fields of the wrong type."""


@dataclass(frozen=True)
class SnapshotHeader:
    state: int
    step: int
    meta_capacity_bytes: int
    meta_nbytes: int
    data_nbytes: int


# ---- the description: JSON, data only ----------------------------------------------------------

# Canonical names only ("float32", not the alias "float"), so a name maps to one dtype both ways.
_DTYPES: dict[str, torch.dtype] = {
    str(value).removeprefix("torch."): value
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise SnapshotUnusable(what)


def _base64(value: str) -> str:
    base64.b64decode(value, validate=True)  # binascii.Error is a ValueError: pydantic reports it
    return value


_Base64 = Annotated[StrictStr, AfterValidator(_base64)]
_Number = Union[StrictInt, StrictFloat]


class RngState(BaseModel):
    """The fields restore_rng_state() reads (rng.py), with their types."""

    model_config = ConfigDict(extra="forbid")

    torch_cpu: _Base64
    torch_cuda: Optional[_Base64] = None
    python: tuple[StrictInt, list[StrictInt], Optional[_Number]] = Field(description="[version, words, gauss_next]")
    numpy: tuple[StrictStr, _Base64, StrictInt, StrictInt, _Number] = Field(
        description="[kind, keys, pos, has_gauss, gauss]"
    )


class SnapshotMeta(BaseModel):
    """The description the checkpointer writes and resume reads. `others` (non-tensor state leaves
    by path) is checked entry by entry by _check_path/_decode_leaf, in its list or dict form."""

    model_config = ConfigDict(extra="forbid")

    job_id: StrictStr
    rank: StrictInt = Field(ge=0)
    world_size: StrictInt = Field(ge=1)
    fingerprint: StrictStr
    model_fingerprint: StrictStr
    others: Union[dict, list]
    extra: dict[StrictStr, Any]
    rng: RngState

    @model_validator(mode="after")
    def _rank_in_world(self) -> "SnapshotMeta":
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be below world_size {self.world_size}")
        return self


def _check_meta(meta: Any) -> None:
    """Raises SnapshotUnusable unless `meta` is a SnapshotMeta."""
    expected = set(SnapshotMeta.model_fields)
    if isinstance(meta, dict) and set(meta) != expected:
        raise SnapshotUnusable(f"the description has fields {sorted(map(str, meta))}, not {sorted(expected)}")
    try:
        SnapshotMeta.model_validate(meta)
    except ValidationError as exc:
        raise SnapshotUnusable(_first_errors(exc)) from None


def _first_errors(exc: ValidationError, count: int = 3) -> str:
    """Which fields are wrong, briefly: a hostile description must not make a huge log line."""
    shown = [f"{'.'.join(map(str, e['loc'])) or 'description'}: {e['msg']}"[:200] for e in exc.errors()[:count]]
    more = exc.error_count() - len(shown)
    return "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def _check_path(path: Any) -> tuple[str | int, ...]:
    _require(
        isinstance(path, (list, tuple)) and all(isinstance(k, str) or _is_int(k) for k in path),
        f"a state path must be a list of strings and integers, not {path!r:.80}",
    )
    return tuple(path)


def _encode_leaf(path: tuple, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise TypeError(
        f"the state leaf at {path!r} is a {type(value).__name__}; the snapshot description holds only "
        "None, bool, int, float, str and torch.dtype"
    )


def _decode_leaf(path: tuple, value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and set(value) == {"dtype"}:
        name = value["dtype"]
        _require(isinstance(name, str) and name in _DTYPES, f"unknown dtype {name!r:.40} at {path!r:.200}")
        return _DTYPES[name]
    raise SnapshotUnusable(f"the state leaf at {path!r:.200} is not a plain value: {value!r:.80}")


def encode_meta(meta: dict[str, Any]) -> bytes:
    """The snapshot description as UTF-8 JSON. Raises TypeError or ValueError for anything that is
    not plain data, rather than writing what read_meta() would refuse."""
    others = []
    try:
        _check_meta(meta)
        for path, value in meta["others"].items():
            path = _check_path(path)
            others.append([list(path), _encode_leaf(path, value)])
    except SnapshotUnusable as exc:
        raise ValueError(f"cannot describe the snapshot: {exc}") from None
    document = dict(meta, others=others)
    try:
        return json.dumps(document, separators=(",", ":"), allow_nan=True).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the snapshot description is not JSON data: {exc}") from exc


def decode_meta(blob: bytes) -> dict[str, Any]:
    """The inverse of encode_meta(). Raises SnapshotUnusable for anything else."""
    try:
        document = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotUnusable(f"the description is not JSON: {type(exc).__name__}: {exc}") from exc
    _require(isinstance(document, dict), "the description must be an object")
    entries = document.get("others")
    _require(isinstance(entries, list), "others must be a list of [path, value]")
    others: dict[tuple, Any] = {}
    for entry in entries:
        _require(
            isinstance(entry, list) and len(entry) == 2, f"others entry not [path, value]: {entry!r:.80}"
        )
        path = _check_path(entry[0])
        _require(path not in others, f"the state path {path!r:.200} appears twice")
        others[path] = _decode_leaf(path, entry[1])
    meta = dict(document, others=others)
    _check_meta(meta)
    return meta


# ---- the file --------------------------------------------------------------------------------------


def _why_untrusted(info: os.stat_result) -> str | None:
    """Why a snapshot file must not be loaded, or None if only this user can have written it."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    uid = os.geteuid()
    if info.st_uid != uid:
        return f"owned by uid {info.st_uid}, not by this process's uid {uid}"
    if info.st_mode & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):04o} gives the group or other users access (expected 0600)"
    return None


def _why_inconsistent(header: SnapshotHeader, size: int) -> str | None:
    if header.state not in (EMPTY, STAGING, COMMITTED):
        return f"unknown state {header.state}"
    if header.meta_capacity_bytes % mmap.PAGESIZE or header.meta_nbytes > header.meta_capacity_bytes:
        return f"description of {header.meta_nbytes} bytes in a region of {header.meta_capacity_bytes}"
    expected = HEADER_BYTES + header.meta_capacity_bytes + max(header.data_nbytes, 1)
    if header.data_nbytes < 0 or expected != size:
        return f"{size} bytes, the header says {expected}"
    return None


def _create_file(path: Path) -> tuple[int, bool]:
    """A new file of our own for the snapshot: (fd, True) at `path`, or (fd, False) private and
    unlinked where `path` is held by another user's file. O_EXCL: never a file that was there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    for _ in range(2):
        try:
            return os.open(path, flags, 0o600), True
        except FileExistsError:
            pass
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if info.st_uid != os.geteuid():
            break
        # Ours: a snapshot of another version or layout, or refused above. Replace it.
        try:
            path.unlink(missing_ok=True)
        except OSError:
            break
    owner = _owner_of(path)
    log.warning(
        "snapshot %s is held by a file that is not ours (%s): this rank stages into a private file "
        "instead, which a restart cannot load from RAM; disk checkpoints are unaffected",
        path,
        owner,
    )
    fd, private = tempfile.mkstemp(prefix=f"{path.name}.private-", dir=path.parent)
    os.unlink(private)
    return fd, False


def _owner_of(path: Path) -> str:
    try:
        return f"owner uid {os.lstat(path).st_uid}"
    except OSError as exc:
        return exc.strerror or str(exc)


class SharedSnapshot:
    def __init__(self, path: Path, fd: int, region: mmap.mmap, *, linked: bool = True) -> None:
        self.path = path
        self._fd = fd
        self._region = region
        self._pinned_ptr: int | None = None
        self._linked = linked  # False: a private file, not reachable at `path`
        info = os.fstat(fd)
        self._identity = (info.st_dev, info.st_ino)

    @classmethod
    def create(cls, path: Path, meta_capacity_bytes: int, data_nbytes: int) -> "SharedSnapshot":
        meta_capacity_bytes = -(-meta_capacity_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        total_bytes = HEADER_BYTES + meta_capacity_bytes + max(data_nbytes, 1)
        fd, linked = _create_file(path)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: open_existing() wants exactly this
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
            if linked:
                path.unlink(missing_ok=True)  # ours: created with O_EXCL, and /dev/shm is sticky
            raise
        snapshot = cls(path, fd, region, linked=linked)
        _HEADER.pack_into(region, 0, _MAGIC, _VERSION, EMPTY, -1, meta_capacity_bytes, 0, data_nbytes)
        return snapshot

    @classmethod
    def open_existing(cls, path: Path) -> "SharedSnapshot | None":
        """The snapshot at `path`, or None if there is none we can trust: absent, not our own file
        (another user could have planted it), readable by others, or not in this version's format."""
        try:
            # O_NONBLOCK: a planted FIFO must not hang the worker before fstat refuses it.
            fd = os.open(path, os.O_RDWR | _O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP (a symlink), EACCES (another user's file), ...
            log.warning("snapshot %s refused: cannot open it (%s); using disk checkpoints", path, exc)
            return None
        try:
            info = os.fstat(fd)
            why = _why_untrusted(info)
            if why is not None:
                log.warning("snapshot %s refused: %s; using disk checkpoints", path, why)
                os.close(fd)
                return None
            if info.st_size < HEADER_BYTES:
                os.close(fd)
                return None
            region = mmap.mmap(fd, info.st_size)  # no MAP_POPULATE: a probe reads only the header
        except BaseException:
            os.close(fd)
            raise
        snapshot = cls(path, fd, region)
        magic, version = _HEADER.unpack_from(region, 0)[:2]
        if magic != _MAGIC or version != _VERSION:
            log.info("snapshot %s ignored: not a version %d snapshot", path, _VERSION)
            snapshot.close()
            return None
        why = _why_inconsistent(snapshot.header(), info.st_size)
        if why is not None:
            log.warning("snapshot %s refused: inconsistent header (%s)", path, why)
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
        """The description stored by begin(): job_id, rank, world_size, fingerprint and
        model_fingerprint, others (non-tensor leaves by state path), extra (JSON) and rng (rng.py)."""
        return encode_meta(meta)

    def read_meta(self) -> dict[str, Any]:
        """The description, validated as a SnapshotMeta. Raises SnapshotUnusable (a ValueError, logged
        here) if it is anything but what describe() writes: never code, whatever the bytes."""
        header = self.header()
        end = HEADER_BYTES + header.meta_nbytes
        try:
            _require(
                header.meta_nbytes <= header.meta_capacity_bytes and end <= self.total_bytes,
                f"a description of {header.meta_nbytes} bytes does not fit its region",
            )
            return decode_meta(self._region[HEADER_BYTES:end])
        except SnapshotUnusable as exc:
            log.warning("snapshot %s refused: %s", self.path, exc)
            raise

    def views(self, layout: StateLayout) -> list[torch.Tensor]:
        """One tensor per slot over the snapshot's bytes. torch.frombuffer gives each its own storage of
        exact size, so DCP writes it as is instead of cloning a view of a larger storage."""
        header = self.header()
        data_offset = HEADER_BYTES + header.meta_capacity_bytes
        if layout.data_nbytes > header.data_nbytes or data_offset + layout.data_nbytes > self.total_bytes:
            raise ValueError(
                f"a layout of {layout.data_nbytes} bytes does not fit the snapshot's {header.data_nbytes}"
            )
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
        """Removes this snapshot's file: only if `path` still names it (never another user's file
        at our path, and nothing for a private snapshot)."""
        if not self._linked:
            return
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) != self._identity:
            log.warning("snapshot %s not removed: the path no longer names this snapshot's file", self.path)
            return
        self.path.unlink(missing_ok=True)
