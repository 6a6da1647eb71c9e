"""The storage faults of an embedded launch, made real rather than simulated: `disk_full` mounts the
job's checkpoint directory as a size-limited tmpfs and, when due, fills it so that the next save runs
out of space part-way through its files (ENOSPC, as on a full shared file system); `store_outage`
runs the job's coordinator on an etcd of its own and, when due, stops it (clients see connections
refused, as when an etcd member dies), starting it again on the same data and ports after
`duration_s`. Everything is undone on every exit path (`close`), and a launch that cannot set a fault
up (not root, no etcd) is refused before anything starts (`unavailable`)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from hyrun.runtime.jobfile import FaultSpec, JobSpec
from hyrun.runtime.local_etcd import LocalEtcd, etcd_binary

log = logging.getLogger("hyrun.faults")

FILLER_NAME = ".hyrun-disk-full"  # in the checkpoint directory; never a checkpoint's name
_LEFT_FREE_BYTES = 64 * 1024  # less than any save needs, so a save starts and fails part-way


def unavailable(job: JobSpec, *, embedded: bool) -> str | None:
    """Why this launch cannot inject the job's storage faults, or None."""
    kinds = sorted({f.kind for f in job.faults if f.is_storage})
    if not kinds:
        return None
    if not embedded:
        return f"{', '.join(kinds)} faults need the embedded cluster (the launcher sets up the disk and the store)"
    if "disk_full" in kinds and os.geteuid() != 0:
        return "disk_full mounts a size-limited tmpfs on the checkpoint directory: run as root"
    if "disk_full" in kinds and shutil.which("mount") is None:
        return "disk_full needs the `mount` command"
    if "store_outage" in kinds and etcd_binary() is None:
        return "store_outage stops an etcd of the job's own: the etcd binary is not installed (apt-get install etcd-server)"
    if "store_outage" in kinds and job.store != "memory":
        return f"store_outage stops an etcd the launcher starts for the job; the job names its own store ({job.store})"
    return None


class StorageFaults:
    """Set up before the cluster starts (`job` then carries the store's address), fired by the
    launcher's fault clock (`fire`), undone by `close`."""

    def __init__(self, job: JobSpec, run_dir: Path) -> None:
        self.checkpoints = Path(job.checkpoint.directory) if job.checkpoint.directory else run_dir / "checkpoints"
        self.mounted = False
        self.etcd: LocalEtcd | None = None
        self.job = job
        kinds = {f.kind for f in job.faults if f.is_storage}
        try:
            if "disk_full" in kinds:
                size_mb = max(f.disk_mb for f in job.faults if f.kind == "disk_full")
                self._mount(size_mb)
            if "store_outage" in kinds:
                self.etcd = LocalEtcd(run_dir / "etcd", name="job")
                self.etcd.start()
                self.job = job.model_copy(update={"store": self.etcd.url})
        except BaseException:
            self.close()
            raise

    def fire(self, fault: FaultSpec) -> Callable[[], None]:
        """Injects `fault` now; returns its repair."""
        if fault.kind == "disk_full":
            return self._fill()
        if fault.kind == "store_outage":
            return self._stop_store()
        raise ValueError(f"{fault.kind} is not a storage fault")

    def close(self) -> None:
        if self.etcd is not None:
            self.etcd.kill()
            self.etcd = None
        if self.mounted:
            # The checkpoints outlive the tmpfs (the final evaluation, `hyrun ckpt`, a resume read them):
            # copied aside, unmounted (lazily: a straggling process may hold a file open), moved back.
            aside = self.checkpoints.with_name(f".{self.checkpoints.name}-from-tmpfs")
            try:
                shutil.copytree(self.checkpoints, aside, symlinks=True, ignore=shutil.ignore_patterns(FILLER_NAME))
            except OSError as error:
                log.warning("could not copy the checkpoints out of the disk_full tmpfs: %s", error)
            subprocess.run(["umount", "-l", str(self.checkpoints)], check=False, capture_output=True)
            self.mounted = False
            if aside.is_dir():
                for entry in aside.iterdir():
                    entry.rename(self.checkpoints / entry.name)
                aside.rmdir()

    def _mount(self, size_mb: int) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if any(self.checkpoints.iterdir()):
            raise RuntimeError(f"disk_full: {self.checkpoints} is not empty; a tmpfs mounted over it would hide "
                               "its checkpoints")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "hyrun-disk-full",
                               str(self.checkpoints)], capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"disk_full: could not mount a tmpfs on {self.checkpoints}: {done.stderr.strip()}")
        self.mounted = True
        log.info("checkpoint directory %s is a %d MiB tmpfs (disk_full)", self.checkpoints, size_mb)

    def _fill(self) -> Callable[[], None]:
        filler = self.checkpoints / FILLER_NAME
        stats = os.statvfs(self.checkpoints)
        free = stats.f_bavail * stats.f_frsize
        with open(filler, "ab") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, max(1, free - _LEFT_FREE_BYTES))
            except OSError as error:  # space freed by a save's cleanup meanwhile: full is full
                if error.errno != errno.ENOSPC:
                    raise
        log.info("checkpoint disk full: %d bytes taken, %d left", free - _LEFT_FREE_BYTES, _LEFT_FREE_BYTES)
        return lambda: filler.unlink(missing_ok=True)

    def _stop_store(self) -> Callable[[], None]:
        etcd = self.etcd
        if etcd is None:
            raise RuntimeError("store_outage: no store of the job's own runs")
        etcd.kill()
        return etcd.start
