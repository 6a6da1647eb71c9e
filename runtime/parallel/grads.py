"""Whole-model questions about gradients spread over a 5D plan: are they all finite (the same answer
on every rank, so every rank skips the same step), and their global norm for clipping.

Gradients live as DTensors (FSDP, TP: their own meshes and placements), as plain tensors holding a
rank's routed experts (expert parallelism: disjoint over ep, identical over edp), and per pipeline
stage; torch's `clip_grad_norm_` assumes one mesh, so the norm is assembled here (TorchTitan does
the same for pipeline and expert parallelism).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from hyrun.runtime.tensors import local_part

from .dims import ParallelDims


def _device(module: nn.Module) -> torch.device:
    return local_part(next(module.parameters())).device


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def grads_finite_everywhere(module: nn.Module) -> bool:
    """Collective over the world: False if any rank holds a non-finite gradient element."""
    grads = _grads(module)
    local = all(bool(torch.isfinite(local_part(g)).all()) for g in grads)
    flag = torch.tensor([0.0 if local else 1.0], device=_device(module))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def global_grad_norm(module: nn.Module, dims: ParallelDims, *, pp_group, ep_group) -> torch.Tensor:
    """Collective: the 2-norm of the whole model's gradient, the same on every rank."""
    by_layout: dict[tuple, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for grad in _grads(module):
        if isinstance(grad, DTensor):
            by_layout.setdefault((grad.device_mesh, grad.placements), []).append(grad)
        else:
            plain.append(grad)
    device = _device(module)  # collectives need tensors where the backend works (NCCL: the GPU)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grads in by_layout.values():
        # A DTensor norm reduces over its own mesh (shards summed, replicas counted once).
        norm = torch.nn.utils.get_total_norm(grads, foreach=False)
        squares += norm.full_tensor().double().to(device) ** 2
    plain_squares = sum((g.double().pow(2).sum().to(device) for g in plain),
                        torch.zeros((), dtype=torch.float64, device=device))
    if dims.ep_enabled and plain:
        # The plain gradients are routed experts here: each ep rank holds different ones.
        dist.all_reduce(plain_squares, group=ep_group)
    squares += plain_squares
    if dims.pp_enabled:
        dist.all_reduce(squares, group=pp_group)
    return squares.sqrt()


def clip_grads_(module: nn.Module, max_norm: float, total_norm: float) -> None:
    """Scales every gradient so a global norm of `total_norm` becomes at most `max_norm` (torch's
    `clip_grad_norm_` rule, with the norm from `global_grad_norm`)."""
    coefficient = min(1.0, max_norm / (total_norm + 1e-6))
    if coefficient < 1.0:
        for grad in _grads(module):
            local_part(grad).mul_(coefficient)
