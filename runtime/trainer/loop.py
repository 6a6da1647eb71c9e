"""The training loop one rank runs: its micro-batches of every global batch, gradient accumulation,
data-parallel gradient reduction (DDP), clipping, the optimizer step, and a report per step.

Gradients are weighted so the update equals the single-card one on the whole global batch whatever
the split: a rank with m of the step's M micro-batches scales its loss by world_size / M, and DDP's
average over world_size ranks then yields the mean over all M micro-batches — also when ranks hold
unequal numbers of micro-batches (mixed cards).
"""

from __future__ import annotations

import contextlib
import logging
import threading
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


class DrainRequest:
    """The coordinator asked for a checkpoint before a card leaves: the next save is waited for
    (committed, not just staged) before the step is reported, so the drain loses no step."""

    def __init__(self) -> None:
        self._pending = threading.Event()

    def request(self, checkpointer) -> None:
        self._pending.set()
        if checkpointer is not None:
            checkpointer.request_now()

    def take(self) -> bool:
        pending = self._pending.is_set()
        self._pending.clear()
        return pending


class Trainer:
    """One rank's training state (model, optimizer, expert LRs, data) and its step."""

    def __init__(self, job: JobSpec, work: RankWork, reporter: Reporter) -> None:
        self.job, self.work, self.reporter = job, work, reporter
        self.config, self.model = build_model(job)
        self.faults = FaultInjector(job.faults, node=work.node, card=work.card_index, generation=work.generation)
        self.step_in_progress = 0
        self.stats = LocalGradStats(lambda: reporter.entered_reduce(work.generation, work.rank, self.step_in_progress))
        self.distributed = work.world_size > 1
        if self.distributed:
            # The only buffers are RoPE tables, identical on every rank: nothing to sync per forward.
            self.wrapped = DistributedDataParallel(self.model, forward_sync_buffers=False)
            self.wrapped.register_comm_hook(self.stats, _stats_then_allreduce)
        else:
            self.wrapped = self.model
        self.optimizer = build_optimizer(self.model, job)
        # Token counts are summed over ranks first, or replicas would pick different expert LRs.
        self.expert_lrs = ExpertLRController(
            self.optimizer, expert_lr_config(job), _all_reduce_sum if self.distributed else None
        )
        training = job.training
        self.data = SyntheticTokens(self.config.vocab_size, training.seq_len, training.seed)
        self.schedule = training.lr_schedule()
        self.loss_scale = work.world_size / training.micro_batches_per_step
        self.tokens_per_micro_batch = training.micro_batch * training.seq_len

    def extra_state(self, step: int) -> dict:
        """Job-wide state beside model and optimizer that a resume needs (collective)."""
        return {"data_position": step + 1, "expert_lr": self.expert_lrs.state_dict()}

    def restore_extra(self, extra: dict) -> int:
        """Restores expert-LR state; returns the first step to train."""
        if "expert_lr" in extra:
            self.expert_lrs.load_state_dict(extra["expert_lr"], holds_pending=self.work.rank == 0)
        return int(extra.get("data_position", 1))

    def forward_backward(self, step: int) -> tuple[float, float]:
        """This rank's micro-batches of `step`; returns (mean cross-entropy, compute seconds)."""
        training, work = self.job.training, self.work
        speed = self.faults.speed(step, work.speed)
        ce_sum, compute_s = 0.0, 0.0
        for i in range(work.micro_batches):
            tokens = self.data.micro_batch(step, work.micro_batch_offset + i, training.micro_batch)
            last = i == work.micro_batches - 1
            # Reduce gradients once per step, on the last micro-batch, not after every one.
            sync = contextlib.nullcontext() if (last or not self.distributed) else self.wrapped.no_sync()
            with sync:
                # CPU time, not wall time: on a shared machine a descheduled rank must not read as a
                # slow card (the straggler policy and the planner's calibration both use this).
                forward_started = time.thread_time()
                output = self.wrapped(tokens[:, :-1])
                loss, ce = lm_loss(output, tokens[:, 1:], aux_loss_coeff=self.config.aux_loss_coeff)
                self.expert_lrs.observe(output.router_stats)
                busy_s = (time.thread_time() - forward_started) / _FORWARD_SHARE_OF_STEP
                # A simulated card's slowdown is its compute: it is what a slower card would spend.
                compute_s += busy_s + throttle(busy_s, speed)
                (loss * self.loss_scale).backward()
            ce_sum += float(ce.detach())
        if not self.distributed:
            self.stats.on_enter_reduce()
            for p in self.model.parameters():
                if p.grad is not None:
                    self.stats.add(p.grad)
        return ce_sum / work.micro_batches, compute_s

    def begin_step(self, step: int) -> float:
        self.step_in_progress = step
        self.faults.at_step_start(step)
        self.stats.corrupt = self.faults.corrupts_gradients(step)
        self.stats.reset()
        lr = lr_at(step - 1, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.model.set_routing_step(step)  # recycle routing draws the same way on every rank and on resume
        return lr

    def apply_update(self, step: int) -> None:
        # One rank's NaN reaches every rank through the reduce: all skip the same step together.
        if grads_are_finite(self.model):
            if self.job.training.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.job.training.optimizer.grad_clip)
            self.optimizer.step()
        self.expert_lrs.maybe_update(step)


def train(
    job: JobSpec, work: RankWork, reporter: Reporter, checkpointer=None, drain: DrainRequest | None = None
) -> MoETransformer:
    """Trains this rank from the newest checkpoint (if a checkpointer is given and one exists) to
    the job's last step; returns the (unwrapped) model."""
    log = logging.getLogger("hyrun.trainer")
    trainer = Trainer(job, work, reporter)
    log.info("model and optimizer built")
    first_step = 1
    if checkpointer is not None:
        info = checkpointer.load_latest(trainer.model, trainer.optimizer)
        if info is not None:
            first_step = trainer.restore_extra(info.extra)
            log.info(
                "resumed from step %d (%s)%s", info.step, info.source,
                f"; refused newer: {'; '.join(info.refused)}" if info.refused else "",
            )  # fmt: skip
    for step in range(first_step, job.training.steps + 1):
        started = time.perf_counter()
        lr = trainer.begin_step(step)
        ce, compute_s = trainer.forward_backward(step)
        if checkpointer is not None:
            checkpointer.fence()  # the last save's copy of the weights must finish before they change
        trainer.apply_update(step)
        if checkpointer is not None and checkpointer.due(step, time.monotonic()):
            checkpointer.save_async(step, trainer.model, trainer.optimizer, extra=trainer.extra_state(step))
            if drain is not None and drain.take():
                checkpointer.wait()
        status = checkpointer.status() if checkpointer is not None else None
        if step == first_step:
            log.info("first step done")
        reporter.report(
            StepRecord(
                generation=work.generation,
                rank=work.rank,
                step=step,
                loss=ce,
                tokens=work.micro_batches * trainer.tokens_per_micro_batch,
                step_time_s=time.perf_counter() - started,
                compute_time_s=compute_s,
                grad_norm=trainer.stats.norm,
                nonfinite_grads=trainer.stats.nonfinite,
                lr=lr,
                checkpoint_step=-1 if status is None or status.last_committed_step is None else status.last_committed_step,
                checkpoint_error=(status.last_error or "") if status is not None else "",
            )
        )
    if checkpointer is not None:
        checkpointer.close()
    return trainer.model
