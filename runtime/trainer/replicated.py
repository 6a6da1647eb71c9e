"""The data-parallel engine: every rank holds the whole model (DDP). Its gradient comm hook sees each
rank's *local* gradients before they are reduced — what locates "one card, one step" numeric faults
— and marks the moment a rank enters the step's all-reduce, which locates a hung rank.

Gradients are weighted so the update equals the single-card one on the whole global batch whatever
the split: a rank with m of the step's M micro-batches scales its loss by world_size / M, and DDP's
average over world_size ranks then yields the mean over all M micro-batches — also when ranks hold
unequal numbers of micro-batches (mixed cards).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hyrun.runtime.model.loss import lm_loss
from hyrun.runtime.model.transformer import MoETransformer
from hyrun.runtime.parallel.timing import FORWARD_SHARE_OF_COMPUTE, throttle

from hyrun.runtime.trainer.step import StepWork


class LocalGradStats:
    """Norm and non-finite count of this rank's gradients *before* they are reduced. DDP hands them
    over bucket by bucket in a comm hook, which is also the moment this rank enters the all-reduce:
    it says so, so a hang can be located."""

    def __init__(self, on_enter_reduce: Callable[[], None] = lambda: None) -> None:
        self.on_enter_reduce = on_enter_reduce
        self.corrupt = False  # fault injection: poison the local gradients before they are reduced
        self.reset()

    def reset(self) -> None:
        self.sum_of_squares = 0.0
        self.nonfinite = 0
        self.buckets = 0

    def add(self, grad: torch.Tensor) -> None:
        if self.corrupt:
            grad.view(-1)[0] = float("nan")
        finite = torch.isfinite(grad)
        self.nonfinite += int((~finite).sum())
        self.sum_of_squares += float(grad[finite].double().pow(2).sum())

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_of_squares)


def _stats_then_allreduce(stats, bucket):
    # Unannotated on purpose: DDP compares the annotations to real classes, and this module's
    # `from __future__ import annotations` would turn them into strings.
    if stats.buckets == 0:
        stats.on_enter_reduce()
    stats.buckets += 1
    stats.add(bucket.buffer())
    buffer = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _all_reduce_sum(counts: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(counts)
    return counts


class ReplicatedEngine:
    """One whole model per rank, DDP across ranks (or alone when world_size is 1)."""

    def __init__(self, model: MoETransformer, *, world_size: int, micro_batches_per_step: int,
                 device: torch.device, on_enter_reduce: Callable[[], None]) -> None:
        self.module = model
        self.layers = model.layer_indices()
        self.stats = LocalGradStats(on_enter_reduce)
        self.distributed = world_size > 1
        self.loss_scale = world_size / micro_batches_per_step
        if self.distributed:
            # The only buffers are RoPE tables, identical on every rank: nothing to sync per forward.
            self.wrapped = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
            self.wrapped.register_comm_hook(self.stats, _stats_then_allreduce)
        else:
            self.wrapped = model
        # Token counts are summed over ranks first, or replicas would pick different expert LRs.
        self.reduce_counts = _all_reduce_sum if self.distributed else None

    def begin_step(self, step: int, *, corrupt: bool) -> None:
        self.stats.corrupt = corrupt
        self.stats.reset()
        self.module.set_routing_step(step)  # recycle routing draws the same way on every rank and on resume

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], *, speed: float, observe) -> StepWork:
        ce_sum, compute_s = 0.0, 0.0
        started = time.perf_counter()
        for i, tokens in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Reduce gradients once per step, on the last micro-batch, not after every one.
            sync = contextlib.nullcontext() if (last or not self.distributed) else self.wrapped.no_sync()
            with sync:
                # CPU time, not wall time: on a shared machine a descheduled rank must not read as a
                # slow card (the straggler policy and the planner's calibration both use this).
                forward_started = time.thread_time()
                # [b, 2, seq + 1]: packed documents, their segment ids second (attention stays inside each).
                tokens, segments = (tokens[:, 0], tokens[:, 1, :-1]) if tokens.dim() == 3 else (tokens, None)
                output = self.wrapped(tokens[:, :-1], segments)
                loss, ce = lm_loss(output, tokens[:, 1:], aux_loss_coeff=self.module.config.aux_loss_coeff)
                observe(output.router_stats, self.layers)
                busy_s = (time.thread_time() - forward_started) / FORWARD_SHARE_OF_COMPUTE
                # A simulated card's slowdown is its compute: it is what a slower card would spend.
                compute_s += busy_s + throttle(busy_s, speed)
                (loss * self.loss_scale).backward()
            ce_sum += float(ce.detach())
        if not self.distributed:
            self.stats.on_enter_reduce()
            for p in self.module.parameters():
                if p.grad is not None:
                    self.stats.add(p.grad)
        step_s = time.perf_counter() - started
        return StepWork(ce=ce_sum / len(micro_batches), compute_s=compute_s,
                        comm_wait_s=max(0.0, step_s - compute_s), bubble_s=0.0,
                        grad_norm=self.stats.norm, nonfinite=self.stats.nonfinite)

    def grads_finite(self) -> bool:
        # One rank's NaN reaches every rank through the reduce: all see the same answer.
        return all(bool(torch.isfinite(p.grad).all()) for p in self.module.parameters() if p.grad is not None)

    def clip_grad_norm(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
