"""The training loop one rank runs: its micro-batches of every global batch, gradient accumulation,
data-parallel gradient reduction (DDP), clipping, the optimizer step, and a report per step.

Gradients are weighted so the update equals the single-card one on the whole global batch whatever
the split: a rank with m of the step's M micro-batches scales its loss by world_size / M, and DDP's
average over world_size ranks then yields the mean over all M micro-batches — also when ranks hold
unequal numbers of micro-batches (mixed cards).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.model import (
    ExpertAdamW,
    ExpertLRConfig,
    ExpertLRController,
    ModelConfig,
    MoETransformer,
    build_param_groups,
    lm_loss,
)
from hyrun.runtime.model.schedule import lr_at
from hyrun.runtime.trainer.data import SyntheticTokens
from hyrun.runtime.trainer.faults import FaultInjector
from hyrun.runtime.trainer.reporting import Reporter, StepRecord

# Backward costs about twice the forward, so a card at speed s is simulated by stretching each
# forward by 3 × (1/s − 1) of its own measured time: the whole micro-batch then takes 1/s as long.
_FORWARD_SHARE_OF_STEP = 1 / 3


@dataclass(frozen=True)
class RankWork:
    """What this rank trains: its place in the world and its share of every global batch."""

    rank: int = 0
    world_size: int = 1
    generation: int = 0
    micro_batches: int = 1
    micro_batch_offset: int = 0
    speed: float = 1.0
    node: str = "local"
    card_index: int = 0


class LocalGradStats:
    """Norm and non-finite count of this rank's gradients *before* they are reduced — what locates
    'one card, one step' numeric faults. DDP hands them over bucket by bucket in a comm hook, which
    is also the moment this rank enters the all-reduce: it says so, so a hang can be located."""

    def __init__(self, on_enter_reduce=lambda: None) -> None:
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


def grads_are_finite(model: torch.nn.Module) -> bool:
    """Whether the (reduced) gradients are all finite: identical on every rank after the reduce."""
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def throttle(compute_s: float, speed: float) -> float:
    """Sleeps so that work that took `compute_s` takes compute_s / speed; returns the time slept."""
    if speed >= 1.0:
        return 0.0
    extra_s = compute_s * (1.0 / speed - 1.0)
    time.sleep(extra_s)
    return extra_s


def build_model(job: JobSpec) -> tuple[ModelConfig, MoETransformer]:
    torch.manual_seed(job.training.seed)  # every rank builds identical initial weights
    config = ModelConfig.from_preset(job.model.preset, **job.model.overrides)
    return config, MoETransformer(config)


def expert_lr_config(job: JobSpec) -> ExpertLRConfig:
    opt = job.training.optimizer
    return ExpertLRConfig(rule=opt.expert_lr_scaling, update_interval_steps=opt.expert_lr_interval_steps)


def build_optimizer(model: MoETransformer, job: JobSpec) -> ExpertAdamW:
    """AdamW with one param group per layer's routed experts, each expert at its own LR."""
    opt = job.training.optimizer
    groups = build_param_groups(model, base_lr=opt.lr, weight_decay=opt.weight_decay, expert_lr=expert_lr_config(job))
    return ExpertAdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)


def _all_reduce_sum(counts: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(counts)
    return counts


def train(job: JobSpec, work: RankWork, reporter: Reporter) -> MoETransformer:
    """Trains every step of the job on this rank's micro-batches; returns the (unwrapped) model."""
    config, model = build_model(job)
    faults = FaultInjector(job.faults, node=work.node, card=work.card_index, generation=work.generation)
    current_step = 0
    stats = LocalGradStats(lambda: reporter.entered_reduce(work.generation, work.rank, current_step))
    distributed = work.world_size > 1
    if distributed:
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
        wrapped.register_comm_hook(stats, _stats_then_allreduce)
    else:
        wrapped = model
    optimizer = build_optimizer(model, job)
    # Token counts are summed over ranks first, or replicas would pick different expert LRs.
    expert_lrs = ExpertLRController(optimizer, expert_lr_config(job), _all_reduce_sum if distributed else None)
    training = job.training
    data = SyntheticTokens(config.vocab_size, training.seq_len, training.seed)
    schedule = training.lr_schedule()
    loss_scale = work.world_size / training.micro_batches_per_step
    tokens_per_micro_batch = training.micro_batch * training.seq_len

    for step in range(1, training.steps + 1):
        current_step = step
        faults.at_step_start(step)
        speed = faults.speed(step, work.speed)
        stats.corrupt = faults.corrupts_gradients(step)
        started = time.perf_counter()
        lr = lr_at(step - 1, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        model.set_routing_step(step)  # recycle routing draws the same way on every rank and on resume
        stats.reset()
        ce_sum, compute_s = 0.0, 0.0
        for i in range(work.micro_batches):
            tokens = data.micro_batch(step, work.micro_batch_offset + i, training.micro_batch)
            last = i == work.micro_batches - 1
            # Reduce gradients once per step, on the last micro-batch, not after every one.
            sync = contextlib.nullcontext() if (last or not distributed) else wrapped.no_sync()
            with sync:
                forward_started = time.perf_counter()
                output = wrapped(tokens[:, :-1])
                loss, ce = lm_loss(output, tokens[:, 1:], aux_loss_coeff=config.aux_loss_coeff)
                expert_lrs.observe(output.router_stats)
                forward_s = time.perf_counter() - forward_started
                compute_s += forward_s / _FORWARD_SHARE_OF_STEP
                throttle(forward_s / _FORWARD_SHARE_OF_STEP, speed)
                (loss * loss_scale).backward()
            ce_sum += float(ce.detach())
        if not distributed:
            stats.on_enter_reduce()
            for p in model.parameters():
                if p.grad is not None:
                    stats.add(p.grad)
        # One rank's NaN reaches every rank through the reduce: all skip the same step together.
        skipped = not grads_are_finite(model)
        if not skipped:
            if training.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.optimizer.grad_clip)
            optimizer.step()
        expert_lrs.maybe_update(step)
        reporter.report(
            StepRecord(
                generation=work.generation,
                rank=work.rank,
                step=step,
                loss=ce_sum / work.micro_batches,
                tokens=work.micro_batches * tokens_per_micro_batch,
                step_time_s=time.perf_counter() - started,
                compute_time_s=compute_s,
                grad_norm=stats.norm,
                nonfinite_grads=stats.nonfinite,
                lr=lr,
            )
        )
    return model
