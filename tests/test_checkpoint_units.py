"""Checkpointing in one process (world size 1): manifest, storage, schedule, damage, failures, CLI.
The multi-process behaviour (bitwise resume, resharding, SIGKILL mid-save) is in
test_checkpoint_distributed.py."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hyrun.common.snapshots import remove_snapshots
from hyrun.runtime.checkpoint.checkpointer import Checkpointer
from hyrun.runtime.checkpoint.hashing import HashingFileSystem
from hyrun.runtime.checkpoint.manifest import Manifest, hash_file
from hyrun.runtime.checkpoint.writer import BackgroundWriter
from hyrun.runtime.checkpoint.resume import CheckpointsUnusable
from hyrun.runtime.checkpoint.settings import CheckpointSettings
from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.checkpoint.cli import app
from hyrun.runtime.checkpoint.manifest import FileEntry, ManifestError
from hyrun.runtime.checkpoint.resume import probe_snapshot
from hyrun.runtime.checkpoint.rng import capture_rng_state, restore_rng_state
from hyrun.runtime.checkpoint.snapshot import COMMITTED, SharedSnapshot, SnapshotUnusable, snapshot_path

SHM = Path("/dev/shm")
# One process saves and loads with no_dist=True on purpose; DCP warns about it every time.
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"), pytest.mark.timeout(60)]


@pytest.fixture
def job():
    job_id = f"unit-{uuid.uuid4().hex[:10]}"
    yield job_id
    remove_snapshots(SHM, job_id)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 4)
    )
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, ckpt, steps, now_s=float, wait=True) -> list[int]:
    """The worker's loop in miniature; returns the steps at which a save started."""
    saved = []
    for step in steps:
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        ckpt.fence()
        optimizer.step()
        optimizer.zero_grad()
        if ckpt.due(step, now_s(step)):
            ckpt.save_async(step, model, optimizer, extra={"data_position": step + 1})
            saved.append(step)
    if wait:
        ckpt.wait()
    return saved


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpointer(directory: Path, job: str, storage=None, **settings) -> Checkpointer:
    return Checkpointer(
        CheckpointSettings(directory=directory, **settings), rank=0, world_size=1, job_id=job, storage=storage
    )


class FullDisk(LocalDirectoryStorage):
    """Storage whose writes fail with ENOSPC while `full` is set, as a full disk does."""

    full = False

    def dcp_writer(self, step):
        writer = super().dcp_writer(step)
        storage = self

        class Writer(type(writer)):
            def write_data(self, plan, planner):
                if storage.full:
                    (storage.staging_path(step) / "__0_0.distcp").write_bytes(b"part of a file")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return super().write_data(plan, planner)

        return Writer(self.staging_path(step))


class TearingFileSystem(HashingFileSystem):
    """Cuts every tensor file to half its size once DCP has written and fsynced it, before the stream
    closes: a torn write, as a dying disk or a second writer would leave it."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield stream
            if Path(path).suffix == ".distcp":
                os.truncate(path, stream.size_bytes // 2)


class TornWrites(LocalDirectoryStorage):
    torn = False

    def dcp_writer(self, step):
        writer = super().dcp_writer(step)
        if self.torn:
            writer.fs = writer.hashing = TearingFileSystem()
        return writer


# ---- pure pieces ----------------------------------------------------------------------------------


def test_settings_reject_values_that_cannot_work():
    with pytest.raises(ValueError, match="keep_last must be >= 1, got 0"):
        CheckpointSettings(directory=Path("x"), keep_last=0)
    with pytest.raises(ValueError, match="interval_s"):
        CheckpointSettings(directory=Path("x"), interval_s=-1)


def test_manifest_round_trips_and_rejects_garbage():
    manifest = Manifest(
        7, "job", 2, {"dp": 2}, {"data_position": 8}, {0: {"a": 1}, 1: {"a": 2}}, {"f": FileEntry(3, "ab")}
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(ManifestError, match="unreadable"):
        Manifest.from_json(b'{"format": "hyrun-checkpoint/1"')
    with pytest.raises(ManifestError, match="format"):
        Manifest.from_json(b'{"format": "other"}')


def test_only_committed_checkpoints_are_listed_and_leftovers_are_swept(tmp_path):
    storage = LocalDirectoryStorage(tmp_path)
    storage.prepare(1)
    storage.write_manifest(1, b"{}")
    storage.commit(1)
    storage.prepare(2)  # a save killed before its commit
    (tmp_path / "step-000000003.trash").mkdir()  # a delete killed half way
    (tmp_path / "step-000000004").mkdir()  # no manifest: never published by us
    assert storage.committed_steps() == [1]
    assert storage.sweep() == ["step-000000002.tmp", "step-000000003.trash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000001", "step-000000004"]


# ---- schedule -------------------------------------------------------------------------------------


def test_due_by_steps(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=3)
    assert train(model, optimizer, ckpt, range(1, 8)) == [3, 6]
    ckpt.close()


def test_due_by_time_and_by_request(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_s=10.0)
    clock = {1: 0.0, 2: 5.0, 3: 10.0, 4: 11.0, 5: 12.0, 6: 19.0, 7: 20.5}
    assert train(model, optimizer, ckpt, range(1, 5), now_s=clock.get) == [3]
    ckpt.request_now()  # the coordinator's "checkpoint now"
    assert train(model, optimizer, ckpt, range(5, 8), now_s=clock.get) == [5]
    assert ckpt.status().last_committed_step == 5
    ckpt.close()


def test_a_timed_save_waits_for_a_busy_writer_instead_of_stalling(tmp_path, job):
    release = threading.Event()

    class SlowDisk(LocalDirectoryStorage):
        def commit(self, step):
            release.wait(30)
            super().commit(step)

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=SlowDisk(tmp_path), interval_s=1.0)
    ckpt.request_now()
    assert ckpt.due(1, 0.0)
    ckpt.save_async(1, model, optimizer)
    assert not ckpt.due(2, 5.0), "writer busy: not due yet"
    release.set()
    ckpt.wait()
    assert ckpt.due(3, 5.0), "free again, and the interval has passed"
    ckpt.close()


def test_extra_must_be_json(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=1)
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save_async(1, model, optimizer, extra={"counts": torch.ones(2)})
    ckpt.close()


def test_the_fence_keeps_a_slow_copy_consistent_with_its_step(tmp_path, job, monkeypatch):
    """The background copy is made slower than a training step: forward N+1 (which updates the batch
    norm's running statistics) runs during it, and fence() holds optimizer step N+1 back until it is
    done. The snapshot must hold exactly the state after step N."""
    from hyrun.runtime.checkpoint import staging

    slow_copy = staging.StagingCopy.copy_in_background

    def slower(self):
        time.sleep(0.3)
        slow_copy(self)

    monkeypatch.setattr(staging.StagingCopy, "copy_in_background", slower)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 2))
    train(model, optimizer, ckpt, range(2, 3), wait=False)  # saves after step 2 ...
    at_step_2 = params(model)
    train(model, optimizer, ckpt, range(3, 4))  # ... and step 3 runs while the copy sleeps
    assert ckpt.status().total_stall_s > 0.1, "the fence waited for the copy"
    ckpt.close()

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    info = ckpt.load_latest(model, optimizer)
    ckpt.close()
    assert info.step == 2
    for key, value in params(model).items():
        assert torch.equal(value, at_step_2[key]), key


# ---- resume ---------------------------------------------------------------------------------------


def test_fresh_start_leaves_the_optimizer_untouched(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    assert ckpt.load_latest(model, optimizer) is None
    assert not optimizer.state, "a fresh AdamW must start at step 0, not with an initialized state"
    ckpt.close()


def test_a_corrupted_checkpoint_is_refused_and_the_previous_one_loads(tmp_path, job, caplog):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    at_step_2 = params(model)
    train(model, optimizer, ckpt, range(3, 5))
    ckpt.close()
    assert LocalDirectoryStorage(tmp_path).committed_steps() == [2, 4]

    damaged = tmp_path / "step-000000004" / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    damaged.write_bytes(bytes(data))

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    with caplog.at_level(logging.WARNING):
        info = ckpt.load_latest(model, optimizer)
    ckpt.close()
    assert (info.step, info.source, info.extra) == (2, "disk", {"data_position": 3})
    assert (
        len(info.refused) == 1
        and "step-000000004" in info.refused[0]
        and "__0_0.distcp: sha256" in info.refused[0]
    )
    assert "refused checkpoint step-000000004" in caplog.text
    for key, value in params(model).items():
        assert torch.equal(value, at_step_2[key]), key

    result = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        "step-000000002: ok" in result.output
        and "step-000000004: DAMAGED __0_0.distcp: sha256" in result.output
    )


def test_when_every_checkpoint_is_refused_resume_stops_instead_of_starting_over(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    ckpt.close()
    (tmp_path / "step-000000002" / ".metadata").write_bytes(b"garbage")

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    with pytest.raises(CheckpointsUnusable, match=r"step-000000002 \(disk\): .metadata: size 7 bytes"):
        ckpt.load_latest(model, optimizer)
    ckpt.close()

    wider = torch.nn.Sequential(torch.nn.Linear(8, 32))  # intact files, but not this model
    (tmp_path / "step-000000002").rename(tmp_path / "elsewhere")
    ckpt = checkpointer(tmp_path, job, interval_steps=1)
    train(model, optimizer, ckpt, range(1, 2))
    ckpt.close()
    ckpt = checkpointer(tmp_path, job)
    with pytest.raises(CheckpointsUnusable, match="Size mismatch"):
        ckpt.load_latest(wider, torch.optim.AdamW(wider.parameters()))
    ckpt.close()


def test_a_full_disk_is_reported_and_training_goes_on(tmp_path, job):
    storage = FullDisk(tmp_path)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=storage, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    storage.full = True
    train(model, optimizer, ckpt, range(3, 5))
    status = ckpt.status()
    assert (status.last_committed_step, status.saves_committed, status.saves_failed) == (2, 1, 1)
    assert (
        "step-000000004: write failed" in status.last_error and "No space left on device" in status.last_error
    )
    assert storage.committed_steps() == [2]
    assert not (tmp_path / "step-000000004.tmp").exists(), "the partial save was removed"
    storage.full = False  # the operator frees space: the next save works again
    train(model, optimizer, ckpt, range(5, 7))
    status = ckpt.status()
    assert (status.last_committed_step, status.saves_failed, status.last_error) == (6, 1, None)
    ckpt.close()


def test_an_unwritable_directory_is_reported(tmp_path, job):
    (tmp_path / "a-file").write_text("not a directory")
    model, optimizer = build()
    ckpt = checkpointer(tmp_path / "a-file" / "ckpt", job, interval_steps=1)
    train(model, optimizer, ckpt, range(1, 3))
    status = ckpt.status()
    assert status.saves_failed == 2 and status.last_committed_step is None
    assert "Not a directory" in status.last_error
    ckpt.close()


def test_the_ram_snapshot_is_newer_than_disk_and_is_loaded_unless_half_written(tmp_path, job):
    """A save that staged but did not reach disk is still in /dev/shm: a restart loads it. A snapshot
    whose worker died during the copy (header still STAGING) is never loaded."""
    storage = FullDisk(tmp_path)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=storage, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    storage.full = True
    train(model, optimizer, ckpt, range(3, 5))
    at_step_4 = params(model)
    ckpt.close()
    assert snapshot_path(SHM, job, 0).exists(), "kept: it holds the only copy of step 4"

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=LocalDirectoryStorage(tmp_path))
    info = ckpt.load_latest(model, optimizer)
    assert (info.step, info.source, info.on_disk) == (4, "shared_memory", False)
    assert all(torch.equal(v, at_step_4[k]) for k, v in params(model).items())
    ckpt.wait()  # it is written out at once
    assert ckpt.status().last_committed_step == 4
    ckpt.close()
    assert not snapshot_path(SHM, job, 0).exists(), "durable now, so the RAM was freed"

    # A snapshot caught mid-copy.
    storage.full = True
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=storage, interval_steps=2)
    ckpt.load_latest(model, optimizer)
    train(model, optimizer, ckpt, range(5, 7))
    ckpt.close()
    snapshot = SharedSnapshot.open_existing(snapshot_path(SHM, job, 0))
    snapshot.begin(6, snapshot.describe(snapshot.read_meta()))  # what a worker killed mid-copy leaves
    snapshot.close()
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    info = ckpt.load_latest(model, optimizer)
    ckpt.close()
    assert (info.step, info.source) == (4, "disk")


# ---- the shared-memory snapshot holds data only, and only our own file is loaded -------------------


def ram_only_step_4(tmp_path: Path, job: str) -> Path:
    """Step 2 committed to disk, step 4 only in this rank's RAM snapshot; returns the snapshot's path."""
    storage = FullDisk(tmp_path)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=storage, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    storage.full = True
    train(model, optimizer, ckpt, range(3, 5))
    ckpt.close()
    path = snapshot_path(SHM, job, 0)
    assert path.exists()
    return path


def resume(tmp_path: Path, job: str) -> tuple[int, str]:
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job)
    info = ckpt.load_latest(model, optimizer)
    ckpt.wait()
    ckpt.close()
    return info.step, info.source


def description(**changes) -> dict:
    meta = {
        "job_id": "unit",
        "rank": 0,
        "world_size": 1,
        "fingerprint": "f" * 64,
        "model_fingerprint": "m" * 64,
        "others": {
            ("optim", "param_groups", 0, "lr"): 1e-3,
            ("optim", "param_groups", 0, "betas", 1): 0.999,
            ("optim", "param_groups", 0, "foreach"): None,
            ("optim", "param_groups", 0, "amsgrad"): False,
            ("optim", "param_groups", 0, "dampening"): 0,
            ("optim", "param_groups", 0, "params", 0): "0.weight",
            ("optim", "param_groups", 0, "max_norm"): float("inf"),
            ("model", "cast_to"): torch.bfloat16,
        },
        "extra": {"data_position": 5, "schedule": {"lr": [1.0, 0.5]}},
        "rng": capture_rng_state(),
    }
    meta.update(changes)
    return meta


def test_a_snapshot_description_round_trips_as_json_data(job):
    meta = description()
    blob = SharedSnapshot.describe(meta)
    assert json.loads(blob)["others"][0] == [["optim", "param_groups", 0, "lr"], 1e-3]
    snapshot = SharedSnapshot.create(snapshot_path(SHM, job, 0), len(blob), 64)
    snapshot.begin(7, blob)
    snapshot.mark_committed()
    snapshot.close()
    assert stat.S_IMODE(snapshot_path(SHM, job, 0).stat().st_mode) == 0o600

    snapshot = SharedSnapshot.open_existing(snapshot_path(SHM, job, 0))
    assert (snapshot.header().state, snapshot.header().step) == (COMMITTED, 7)
    read = snapshot.read_meta()
    snapshot.close()
    assert read == meta
    assert read["others"][("model", "cast_to")] is torch.bfloat16
    restore_rng_state(read["rng"])  # what resume does with it

    with pytest.raises(TypeError, match=r"leaf at \('model', 'hook'\) is a object"):
        SharedSnapshot.describe(description(others={("model", "hook"): object()}))
    with pytest.raises(ValueError, match="description has fields"):
        SharedSnapshot.describe({**description(), "code": "anything"})


class Planted:
    """A pickle that creates a file when unpickled: proof that nothing unpickles the snapshot."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def garbage(kind: str, valid: bytes, marker: Path) -> bytes:
    document = json.loads(valid)
    if kind == "pickle":
        return pickle.dumps(Planted(marker))
    if kind == "binary":
        return bytes(range(256)) * 4
    if kind == "not utf-8":
        return b'{"job_id": "\xff\xfe"}'
    if kind == "nested too deep":
        return b"[" * 200_000
    if kind == "rank as a string":
        document["rank"] = "0"
    elif kind == "unknown dtype":
        document["others"].append([["model", "x"], {"dtype": "float1024"}])
    elif kind == "object leaf":
        document["others"].append([["model", "x"], {"__class__": "os.system"}])
    elif kind == "rng not base64":
        document["rng"]["torch_cpu"] = "not base64!"
    elif kind == "missing field":
        del document["others"]
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    "kind",
    [
        "pickle",
        "binary",
        "not utf-8",
        "nested too deep",
        "rank as a string",
        "unknown dtype",
        "object leaf",
        "rng not base64",
        "missing field",
    ],
)
def test_a_garbage_description_is_refused_not_a_crash(tmp_path, job, kind, caplog):
    path = snapshot_path(SHM, job, 0)
    valid = SharedSnapshot.describe(description(job_id=job))
    snapshot = SharedSnapshot.create(path, 1 << 20, 64)
    snapshot.begin(3, garbage(kind, valid, tmp_path / "unpickled"))
    snapshot.mark_committed()
    snapshot.close()

    snapshot = SharedSnapshot.open_existing(path)
    with caplog.at_level(logging.WARNING), pytest.raises(SnapshotUnusable):
        snapshot.read_meta()
    snapshot.close()
    assert f"snapshot {path} refused" in caplog.text
    step, why = probe_snapshot(path, job, 0, 1, "m" * 64)  # what resume asks first, on every rank
    assert step == -1 and why.startswith("unreadable snapshot")
    assert not (tmp_path / "unpickled").exists()


def test_a_pickle_planted_in_the_snapshot_is_not_loaded_and_resume_uses_disk(tmp_path, job, caplog):
    path = ram_only_step_4(tmp_path, job)
    snapshot = SharedSnapshot.open_existing(path)
    snapshot.begin(4, pickle.dumps(Planted(tmp_path / "unpickled")))
    snapshot.mark_committed()
    snapshot.close()
    with caplog.at_level(logging.WARNING):
        assert resume(tmp_path, job) == (2, "disk")
    assert not (tmp_path / "unpickled").exists()
    assert "the description is not JSON" in caplog.text


def test_a_snapshot_file_of_another_user_or_open_to_others_is_refused(tmp_path, job, caplog):
    path = ram_only_step_4(tmp_path, job)
    ours = os.geteuid(), os.getegid()
    for owner, mode, why in [
        ((12345, 12345), 0o600, "owned by uid 12345, not by this process's uid"),
        (ours, 0o666, "mode 0666 gives the group or other users access"),
        (ours, 0o640, "mode 0640 gives the group or other users access"),
    ]:
        os.chown(path, *owner)
        os.chmod(path, mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert SharedSnapshot.open_existing(path) is None
            assert resume(tmp_path, job) == (2, "disk")
        assert f"snapshot {path} refused: {why}" in caplog.text
    # The same bytes, ours and 0600 again: loaded from RAM, so the refusals were the owner and mode.
    os.chown(path, *ours)
    os.chmod(path, 0o600)
    assert resume(tmp_path, job) == (4, "shared_memory")


def test_a_file_planted_at_the_snapshot_path_is_neither_written_nor_loaded(tmp_path, job, caplog):
    """Another user creates /dev/shm/hyrun-<job>-rank0 first: saves go on (to disk), into a private
    snapshot, and the planted file is left exactly as it was, never opened for writing nor removed."""
    path = snapshot_path(SHM, job, 0)
    planted = b"HYRUNSNP" + b"\x00" * 8192
    path.write_bytes(planted)
    os.chown(path, 12345, 12345)
    os.chmod(path, 0o666)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=2)
    with caplog.at_level(logging.WARNING):
        train(model, optimizer, ckpt, range(1, 5))
    status = ckpt.status()
    ckpt.close()
    assert (status.last_committed_step, status.saves_failed) == (4, 0)
    assert "stages into a private file instead" in caplog.text
    assert path.read_bytes() == planted
    assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (12345, 0o666)
    assert resume(tmp_path, job) == (4, "disk")


def test_a_symlink_at_the_snapshot_path_is_not_followed(tmp_path, job):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = snapshot_path(SHM, job, 0)
    path.symlink_to(victim)
    assert SharedSnapshot.open_existing(path) is None
    snapshot = SharedSnapshot.create(path, 4096, 64)  # replaces the link (ours: we run as its owner)
    snapshot.close()
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink()


def test_cli_lists_committed_checkpoints(tmp_path, job):
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=1, keep_last=2)
    train(model, optimizer, ckpt, range(1, 4))
    ckpt.close()
    result = CliRunner().invoke(app, ["ls", str(tmp_path)])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["step-000000002", "step-000000003"], "keep_last=2"
    assert all(line.rstrip().endswith("sizes ok") for line in lines[1:])
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "step-000000003")]).exit_code == 0
    assert CliRunner().invoke(app, ["ls", str(tmp_path / "missing")]).exit_code == 2


def test_the_manifest_records_each_files_real_hash_taken_while_writing(tmp_path, job, monkeypatch):
    """No file is read back to hash it, and the hashes recorded on the way out are the files' own."""
    reads = []
    monkeypatch.setattr(LocalDirectoryStorage, "file_entry", lambda *a, **k: reads.append(a) or 1 / 0)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, interval_steps=2, io_threads=2)
    train(model, optimizer, ckpt, range(1, 5))
    assert ckpt.status().saves_failed == 0, ckpt.status().last_error
    ckpt.close()
    assert reads == [], "the commit re-read files to hash them"
    from torch.utils.serialization import config

    assert config.save.compute_crc32, "the CRC switch is restored once the save is written"
    for step in (2, 4):
        folder = tmp_path / f"step-{step:09d}"
        manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
        on_disk = {path.name for path in folder.iterdir()} - {"manifest.json"}
        assert set(manifest.files) == on_disk
        assert {name: hash_file(folder / name) for name in on_disk} == manifest.files


def test_a_writer_that_does_not_hash_gets_its_files_hashed_from_disk(tmp_path, job):
    """A storage backend whose DCP writer records nothing still gets a complete, exact manifest."""
    from torch.distributed.checkpoint import FileSystemWriter

    class PlainWriter(LocalDirectoryStorage):
        def dcp_writer(self, step):
            return FileSystemWriter(self.staging_path(step), single_file_per_rank=True, sync_files=True)

    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=PlainWriter(tmp_path), interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    assert ckpt.status().last_committed_step == 2, ckpt.status().last_error
    ckpt.close()
    folder = tmp_path / "step-000000002"
    manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
    assert manifest.files == {p.name: hash_file(p) for p in folder.iterdir() if p.name != "manifest.json"}


def test_a_torn_write_is_refused_and_resume_picks_the_previous_checkpoint(tmp_path, job):
    storage = TornWrites(tmp_path)
    model, optimizer = build()
    ckpt = checkpointer(tmp_path, job, storage=storage, interval_steps=2)
    train(model, optimizer, ckpt, range(1, 3))
    storage.torn = True
    train(model, optimizer, ckpt, range(3, 5))
    status = ckpt.status()
    assert (status.last_committed_step, status.saves_failed) == (2, 1)
    assert "torn write" in status.last_error and ".distcp" in status.last_error
    assert storage.committed_steps() == [2]
    assert not (tmp_path / "step-000000004.tmp").exists()
    ckpt.close()
    remove_snapshots(SHM, job)  # a restart elsewhere: only disk counts
    fresh_model, fresh_optimizer = build()
    restarted = checkpointer(tmp_path, job)
    info = restarted.load_latest(fresh_model, fresh_optimizer)
    assert info is not None and (info.step, info.source) == (2, "disk")
    restarted.close()


def test_the_persisting_thread_runs_niced_and_the_staging_copy_does_not(tmp_path):
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}
    writer = BackgroundWriter("unit", persist_nice=5)
    writer.submit(lambda: seen.update(stage=nice()), lambda: seen.update(persist=nice()))
    assert writer.wait_idle(30)
    assert writer.close(30)
    assert seen == {"stage": nice(), "persist": min(19, nice() + 5)}
