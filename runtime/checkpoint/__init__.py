"""Fast asynchronous checkpoints, verified and resharded on resume.

Built on torch.distributed.checkpoint (DCP) for the on-disk format and load-time resharding; hyrun
adds staging into a reused shared-memory snapshot, a background writer, a manifest with a SHA-256 per
file, an all-ranks commit by atomic rename, and a resume that falls back past damaged checkpoints.

The worker's loop; every call is made on every rank, in this order::

    ckpt = Checkpointer(CheckpointSettings(directory=..., interval_steps=100, keep_last=3),
                        rank=rank, world_size=world, job_id=job_id, layout={"dp": 4})  # collective
    info = ckpt.load_latest(model, optimizer)   # collective; ResumeInfo | None, RNG restored
    if info:
        scheduler.load_state_dict(info.extra["lr_schedule"])
    first = info.extra["data_position"] if info else 1
    for step in range(first, last + 1):
        forward_backward(step)
        ckpt.fence()                            # the last save's copy of the weights must be done
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        if ckpt.due(step, time.monotonic()):    # the same answer on every rank
            ckpt.save_async(step, model, optimizer,
                            extra={"lr_schedule": scheduler.state_dict(), "data_position": step + 1})
        report(ckpt.status())                   # last_committed_step, last_error, saves_failed, ...
    ckpt.close()

- `ckpt.request_now()`, from any thread (the coordinator's "checkpoint now"), makes due() return True
  on every rank a step or two later; `ckpt.wait()` blocks until that save has committed or failed.
- A failed save (disk full, permission) is logged, counted and named in status().last_error; it never
  raises, and never leaves anything that looks committed. Training goes on from the last checkpoint.
- load_latest raises CheckpointsUnusable if checkpoints exist but every one is refused (damaged, or
  not this model): starting over would silently train over them.
- Each rank's snapshot is /dev/shm/hyrun-<job_id>-rank<r> (the size of its state); close() frees it
  once it is on disk. The agent records who owns it and frees what no running job owns
  (hyrun.common.snapshots); remove_snapshots(shm_dir, job_id) frees one ended job's.

On disk: DIR/step-000000123/{__<rank>_<n>.distcp, .metadata, manifest.json} (storage.py); `hyrun ckpt
ls DIR` and `hyrun ckpt verify DIR` (cli.py) list and re-hash them without loading torch.

Import each name from its module (`checkpointer.Checkpointer`, `settings.CheckpointSettings`, ...): this
package re-exports nothing, so the CLI and the agent can read checkpoints without torch.
"""
