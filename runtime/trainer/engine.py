"""What a training step's engine returns, whichever engine ran it (`ReplicatedEngine` for plain data
parallelism, `PlannedEngine` for any 5D layout), and the choice between the two."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hyrun.runtime.model import MoETransformer
from hyrun.runtime.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class StepWork:
    ce: float  # mean cross-entropy over this rank's replica's micro-batches
    compute_s: float  # busy computing (a simulated card's slowdown included)
    comm_wait_s: float  # waiting on collectives
    bubble_s: float  # idle in the pipeline bubble
    grad_norm: float  # this rank's local gradient norm (before reduction where the engine can see it)
    nonfinite: int  # local numeric faults: non-finite local gradients, or forwards that produced NaN


def build_engine(model: MoETransformer, layout: ParallelLayout, *, world_size: int, micro_batches_per_step: int,
                 device: torch.device, on_enter_reduce: Callable[[], None]):
    """DDP for plain data parallelism (its comm hook sees local gradients), the 5D engine otherwise.
    Collective: every rank builds its engine at the same point."""
    if layout.data_parallel_only:
        from hyrun.runtime.trainer.replicated import ReplicatedEngine

        return ReplicatedEngine(model, world_size=world_size, micro_batches_per_step=micro_batches_per_step,
                                device=device, on_enter_reduce=on_enter_reduce)
    from hyrun.runtime.trainer.planned import PlannedEngine

    return PlannedEngine(model, layout, device=device, on_enter_reduce=on_enter_reduce)
