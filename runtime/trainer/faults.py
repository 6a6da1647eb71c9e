"""Faults a worker injects into itself, keyed by (card, generation, step) from the job file's
`faults` section: what tests, benchmarks and `hyrun chaos` use to make a card die, hang, produce
NaN gradients, slow down, or damage the newest committed checkpoint (then die, so that the next
generation must resume past it) at an exact, repeatable point."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from hyrun.runtime.jobfile import FaultSpec


class FaultInjector:
    def __init__(self, faults: list[FaultSpec], *, node: str, card: int, generation: int) -> None:
        # A slowed card stays slow in later generations: degraded hardware does not heal on restart.
        self.generation = generation
        self.faults = [
            f for f in faults
            if f.node == node and f.card == card and (f.generation == generation or (f.kind == "slow" and f.generation < generation))
        ]  # fmt: skip
        self.checkpoint_dir: Path | None = None  # where the job's checkpoints go (set by the loop)

    def _firing(self, kind: str, step: int) -> FaultSpec | None:
        for fault in self.faults:
            if fault.kind == kind and fault.at_step <= step < fault.at_step + fault.repeat_steps:
                return fault
        return None

    def at_step_start(self, step: int) -> None:
        if self._firing("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        damage = self._firing("corrupt_checkpoint", step)
        if damage is not None and self.checkpoint_dir is not None:
            damage_newest_checkpoint(self.checkpoint_dir, damage.damage)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._firing("hang", step):
            os.kill(os.getpid(), signal.SIGSTOP)

    def corrupts_gradients(self, step: int) -> bool:
        return self._firing("nan_grad", step) is not None

    def speed(self, step: int, declared: float) -> float:
        slowed = [
            f.speed for f in self.faults if f.kind == "slow" and (f.generation < self.generation or step >= f.at_step)
        ]
        return min([declared, *slowed])


def damage_newest_checkpoint(directory: Path, how: str) -> Path | None:
    """Flips bytes in, truncates or deletes the largest file of the newest committed checkpoint
    under `directory` (a rank's shard); returns it (None when nothing is committed yet)."""
    committed = sorted(p for p in Path(directory).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    files = sorted((f for f in committed[-1].rglob("*") if f.is_file()), key=lambda f: f.stat().st_size) if committed else []
    if not files:
        return None
    target = files[-1]
    logging.getLogger("hyrun.trainer").warning("fault: %s %s of the newest committed checkpoint", how, target)
    if how == "delete":
        target.unlink()
    elif how == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    else:
        with open(target, "r+b") as f:
            f.seek(target.stat().st_size // 2)
            chunk = f.read(64)
            f.seek(target.stat().st_size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    return target
