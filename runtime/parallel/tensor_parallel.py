"""Tensor parallelism with torch's `parallelize_module`: attention heads and the shared expert's
hidden units split column-wise, their output projections row-wise (Megatron style, one all-reduce
after attention and one after the shared expert). Routed experts are not split here (that is EP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from hyrun.runtime.model.norm import RMSNorm

from .stage import StageTransformer


def apply_tensor_parallel(model: StageTransformer, tp_mesh: DeviceMesh) -> None:
    tp = tp_mesh.size()
    config = model.config
    for name, value in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
                        ("shared_ffn_size", config.shared_ffn_size)):
        if value % tp:
            raise ValueError(f"tp={tp} must divide {name}={value}")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[kind]() for name, kind in model.tensor_parallel_plan().items()}
    parallelize_module(model, tp_mesh, plan)
    group = tp_mesh.get_group()
    for block in model.blocks.values():
        attention = block.attention
        # The projections now return this rank's heads only: the view() in forward must use them.
        attention.num_heads //= tp
        attention.num_kv_heads //= tp
        # q/k norms see only this rank's heads, so their weight gradients are partial sums.
        for norm in (attention.q_norm, attention.k_norm):
            if norm is not None:
                norm.__class__ = HeadShardedRMSNorm
                norm.tp_group = group


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in the backward."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadShardedRMSNorm(RMSNorm):
    """An RMSNorm applied to head-sharded activations: same weight on every TP rank, gradient summed."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _SumGradOverGroup.apply(self.weight, self.tp_group)
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * weight.float()).to(x.dtype)
