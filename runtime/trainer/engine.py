"""The choice of a rank's training engine: `ReplicatedEngine` (DDP) for plain data parallelism,
`PlannedEngine` (the 5D engine) for any other layout. Both return a `step.StepWork` per step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hyrun.runtime.model.transformer import MoETransformer
from hyrun.runtime.parallel.layout import ParallelLayout
from hyrun.runtime.trainer.planned import PlannedEngine
from hyrun.runtime.trainer.replicated import ReplicatedEngine


def build_engine(model: MoETransformer, layout: ParallelLayout, *, world_size: int, micro_batches_per_step: int,
                 device: torch.device, on_enter_reduce: Callable[[], None]):
    """DDP for plain data parallelism (its comm hook sees local gradients), the 5D engine otherwise.
    Collective: every rank builds its engine at the same point."""
    if layout.data_parallel_only:
        return ReplicatedEngine(model, world_size=world_size, micro_batches_per_step=micro_batches_per_step,
                                device=device, on_enter_reduce=on_enter_reduce)
    return PlannedEngine(model, layout, device=device, on_enter_reduce=on_enter_reduce)
