"""Who owns a RAM checkpoint snapshot on this host, and the clean-up that frees the snapshots of jobs
nobody runs any more.

A rank's snapshot (`<shm>/hyrun-<job>-rank<r>`, written by runtime/checkpoint/snapshot.py) outlives
its worker on purpose: a restart on the node reads it from RAM. It must not outlive the job. The agent
that hands a rank to a worker first writes an ownership record beside the snapshot
(`hyrun-<job>-rank<r>.owner`: job, rank, the agent's pid and start time). The agent on its way out
removes what it owns, and any agent removes what a dead owner left (a SIGKILLed launcher or agent):
a snapshot is removed only through a record, never by a blind glob of /dev/shm.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyrun.common.env import DEFAULT_SHM_DIR, SHM_DIR_ENV
from hyrun.common.process import is_same_process, process_start_ticks

log = logging.getLogger("hyrun.snapshots")

_OWNER_SUFFIX = ".owner"
_JOB_ID = r"[A-Za-z0-9_.-]+"
_RECORD_NAME = re.compile(rf"hyrun-(?P<job>{_JOB_ID})-rank(?P<rank>\d+){re.escape(_OWNER_SUFFIX)}")


def shared_memory_dir() -> Path:
    """The tmpfs folder snapshots live in: $HYRUN_SHM_DIR (set by the agent for its workers, or by a
    test for a private one), else /dev/shm."""
    return Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR)


def snapshot_path(shm_dir: Path, job_id: str, rank: int) -> Path:
    return Path(shm_dir) / f"hyrun-{job_id}-rank{rank}"


def owner_path(shm_dir: Path, job_id: str, rank: int) -> Path:
    return Path(f"{snapshot_path(shm_dir, job_id, rank)}{_OWNER_SUFFIX}")


class SnapshotOwner(BaseModel):
    """The ownership record of one rank's snapshot: which process answers for it."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    job_id: str = Field(pattern=f"^{_JOB_ID}$")
    rank: int = Field(ge=0)
    owner_pid: int = Field(gt=0)
    owner_start_ticks: int = Field(ge=0, description="/proc/PID/stat start time: tells a reused pid apart")

    @classmethod
    def this_process(cls, job_id: str, rank: int) -> "SnapshotOwner":
        pid = os.getpid()
        return cls(job_id=job_id, rank=rank, owner_pid=pid, owner_start_ticks=process_start_ticks(pid) or 0)

    def is_mine(self) -> bool:
        return self == SnapshotOwner.this_process(self.job_id, self.rank)

    def owner_alive(self) -> bool:
        return is_same_process(self.owner_pid, self.owner_start_ticks)


def claim_snapshot(shm_dir: Path, job_id: str, rank: int) -> SnapshotOwner:
    """Records this process as the owner of rank `rank`'s snapshot of `job_id` (before a worker can
    write it). Written to a temporary name and renamed: a reader never sees half a record."""
    owner = SnapshotOwner.this_process(job_id, rank)
    final = owner_path(shm_dir, job_id, rank)
    temporary = final.with_name(f".{final.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(owner.model_dump_json())
    os.replace(temporary, final)
    return owner


def read_owner(record: Path) -> SnapshotOwner | None:
    """The record at `record`, or None (logged) if it is not one we can trust: not a regular file of
    this user, not a valid record, or one whose contents disagree with its name."""
    match = _RECORD_NAME.fullmatch(record.name)
    try:
        info = os.lstat(record)
        if match is None or not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            log.warning("snapshot record %s ignored: not a record of this user", record)
            return None
        owner = SnapshotOwner.model_validate_json(record.read_bytes())
    except FileNotFoundError:
        return None  # removed meanwhile by another agent
    except (OSError, ValidationError) as exc:
        log.warning("snapshot record %s ignored: %s", record, exc)
        return None
    if (owner.job_id, owner.rank) != (match["job"], int(match["rank"])):
        log.warning("snapshot record %s ignored: it names job %s rank %d", record, owner.job_id, owner.rank)
        return None
    return owner


def free_orphaned_snapshots(shm_dir: Path, *, leaving: bool = False) -> list[Path]:
    """Removes every snapshot (and its record) whose owner is no longer running: its process is gone,
    or its pid now belongs to another process. `leaving`: this process is on its way out, so what it
    owns goes too. A live owner's snapshot is kept. Returns the snapshot files removed."""
    removed = []
    for record in sorted(Path(shm_dir).glob(f"hyrun-*-rank*{_OWNER_SUFFIX}")):
        owner = read_owner(record)
        if owner is None or (owner.owner_alive() and not (leaving and owner.is_mine())):
            continue
        snapshot = snapshot_path(shm_dir, owner.job_id, owner.rank)
        if _remove(snapshot):
            removed.append(snapshot)
        _remove(record)
    if removed:
        log.info("freed %d RAM snapshot(s) of jobs no longer running: %s", len(removed), [p.name for p in removed])
    return removed


def remove_snapshots(shm_dir: Path, job_id: str) -> list[Path]:
    """Frees the RAM of every rank's snapshot of one job on this node (and their records), for a
    caller that knows the job is over. A file we may not remove (another user's, in the sticky
    /dev/shm) is logged and left."""
    removed = []
    for path in sorted(Path(shm_dir).glob(f"hyrun-{job_id}-rank*")):
        if _remove(path) and not path.name.endswith(_OWNER_SUFFIX):
            removed.append(path)
    return removed


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("snapshot %s not removed: %s", path, exc.strerror)
        return False
    return True
