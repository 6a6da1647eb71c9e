"""FSDP2 (`fully_shard`) over dp × cp, applied last: per block, then the root.

Parameters stay unsharded between forward and backward (`reshard_after_forward=False`): replicas
with different micro-batch counts then gather parameters once per step, on their first forward, and
reduce-scatter once, on their last backward, so their collectives pair up however uneven the split.
Routed experts under expert parallelism are left out (they differ per rank by design).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from .expert_parallel import ExpertParallelExperts
from .stage import StageTransformer


def apply_fsdp(model: StageTransformer, dp_mesh: DeviceMesh) -> None:
    ignored = {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}
    for block in model.blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=False, ignored_params=ignored or None)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, ignored_params=ignored or None)


def set_gradient_sync(model: nn.Module, last_micro_batch: bool) -> None:
    """Reduce-scatter (and free the unsharded parameters) only after the step's last micro-batch."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
        model.set_reshard_after_backward(last_micro_batch)
