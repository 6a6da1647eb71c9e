"""Pipeline parallelism with `torch.distributed.pipelining`: stages from the plan's (uneven) layer
counts, a 1F1B schedule over this replica's micro-batches, embedding on the first stage and the norm
and head on the last. The running aux-loss sum travels with the hidden state, so the last stage's
loss includes every layer's load-balancing term and its gradient flows back to all stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B


def stage_layers(layers_per_stage: Sequence[int], split_points: Sequence[int], num_layers: int) -> list[range]:
    """Each stage's layer range; ValueError unless the counts cover the model and every stage starts
    at a legal split point (a CLA consumer needs its producer on the same stage)."""
    if sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage={tuple(layers_per_stage)} sums to {sum(layers_per_stage)}, "
                         f"the model has {num_layers} layers (each stage needs at least one)")
    ranges, start = [], 0
    for count in layers_per_stage:
        if start not in split_points:
            raise ValueError(f"a stage cannot start at layer {start}: it reads the K/V of layer {start - 1} "
                             f"(cross-layer attention); legal stage starts are {list(split_points)}")
        ranges.append(range(start, start + count))
        start += count
    return ranges


def build_schedule(module: torch.nn.Module, *, pp_mesh: DeviceMesh, num_micro_batches: int,
                   loss_fn: Callable, device: torch.device) -> Schedule1F1B:
    """A 1F1B schedule for this rank's stage; gradients are not divided by the micro-batch count
    (the loss function carries the token weighting)."""
    stage = PipelineStage(module, pp_mesh.get_local_rank(), pp_mesh.size(), device, group=pp_mesh.get_group())
    return Schedule1F1B(stage, num_micro_batches, loss_fn=loss_fn, scale_grads=False)
