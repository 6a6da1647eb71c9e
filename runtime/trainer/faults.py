"""Faults a worker injects into itself, keyed by (card, generation, step) from the job file's
`faults` section: what tests, benchmarks and `hyrun chaos` use to make a card die, hang, produce
NaN gradients or slow down at an exact, repeatable point."""

from __future__ import annotations

import os
import signal

from hyrun.runtime.jobfile import FaultSpec


class FaultInjector:
    def __init__(self, faults: list[FaultSpec], *, node: str, card: int, generation: int) -> None:
        # A slowed card stays slow in later generations: degraded hardware does not heal on restart.
        self.generation = generation
        self.faults = [
            f for f in faults
            if f.node == node and f.card == card and (f.generation == generation or (f.kind == "slow" and f.generation < generation))
        ]  # fmt: skip

    def _firing(self, kind: str, step: int) -> FaultSpec | None:
        for fault in self.faults:
            if fault.kind == kind and fault.at_step <= step < fault.at_step + fault.repeat_steps:
                return fault
        return None

    def at_step_start(self, step: int) -> None:
        if self._firing("kill", step):
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
