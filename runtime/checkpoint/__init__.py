"""Fast asynchronous checkpoints, verified and resharded on resume.

Built on torch.distributed.checkpoint (DCP) for the on-disk format and load-time resharding; hyrun
adds staging into a reused shared-memory snapshot, a background writer, a manifest with SHA-256 per
file, an all-ranks commit by atomic rename, and a resume that falls back past damaged checkpoints.

The worker's loop (every call on every rank, in this order)::

    ckpt = Checkpointer(CheckpointSettings(directory=..., interval_steps=100, interval_s=0, keep_last=3),
                        rank=rank, world_size=world, job_id=job_id, layout={"dp": 4, ...})
    info = ckpt.load_latest(model, optimizer)          # ResumeInfo | None; RNG already restored
    start = info.step + 1 if info else 1              # restore LR schedule etc. from info.extra
    for step in range(start, last + 1):
        loss = forward_backward(step)
        ckpt.fence()                                  # the last save's host copy must be done
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if ckpt.due(step, time.monotonic()):          # same answer on every rank
            ckpt.save_async(step, model, optimizer, extra={"lr_schedule": scheduler.state_dict(),
                                                           "data_position": step + 1})
        report(ckpt.status())                         # last_committed_step, last_error, counters
    ckpt.close()

`ckpt.request_now()` (any thread) makes due() return True on every rank a step or two later.
A failed save is counted and logged, and its message is in status().last_error; it never raises and
never leaves anything that looks committed. Layout of a checkpoint directory, and `hyrun ckpt ls /
verify`: see storage.py and cli.py.
"""

from .checkpointer import Checkpointer, CheckpointStatus
from .manifest import Manifest
from .resume import ResumeInfo
from .settings import CheckpointSettings
from .snapshot import remove_snapshots
from .storage import CheckpointStorage, LocalDirectoryStorage

__all__ = [
    "CheckpointSettings",
    "CheckpointStatus",
    "CheckpointStorage",
    "Checkpointer",
    "LocalDirectoryStorage",
    "Manifest",
    "ResumeInfo",
    "remove_snapshots",
]
