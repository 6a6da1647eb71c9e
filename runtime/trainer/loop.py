"""The training loop one rank runs: its replica's micro-batches of every global batch through its
engine (plain data parallelism, or its part of a 5D layout), clipping, the optimizer step with
expert-specific learning rates, checkpoints, and a report per step."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hyrun.runtime.export.load import load_export
from hyrun.runtime.jobfile import JobSpec, ModelSection
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.expert_lr import ExpertLRConfig, ExpertLRController, build_param_groups, expert_rows
from hyrun.runtime.model.optimizer import ExpertAdamW
from hyrun.runtime.model.transformer import MoETransformer
from hyrun.runtime.model.schedule import lr_at
from hyrun.runtime.parallel.collective_ledger import LEDGER
from hyrun.runtime.parallel.layout import ParallelLayout
from hyrun.runtime.trainer.engine import build_engine
from hyrun.runtime.data.spec import StagePlan, anneal_schedule
from hyrun.runtime.trainer.data import RealTokens, build_data
from hyrun.runtime.trainer.checkpoint_report import CheckpointReport
from hyrun.runtime.trainer.faults import FaultInjector
from hyrun.runtime.trainer.reporting import Reporter, StepRecord


@dataclass(frozen=True)
class RankWork:
    """What this rank trains: its place in the world, the layout every rank builds, and its card."""

    rank: int = 0
    world_size: int = 1
    generation: int = 0
    layout: ParallelLayout | None = None  # None: plain data parallelism, micro-batches split evenly
    speed: float = 1.0
    node: str = "local"
    card_index: int = 0
    device: str = "cpu"  # "cuda:N" where the backend is NCCL
    log_dir: str = ""  # the rank's log directory (sample-id records go there when the job asks)

    def resolved_layout(self, micro_batches_per_step: int) -> ParallelLayout:
        if self.layout is not None:
            return self.layout
        base, extra = divmod(micro_batches_per_step, self.world_size)
        return ParallelLayout.data_parallel([base + (1 if r < extra else 0) for r in range(self.world_size)])


def build_model(job: JobSpec) -> tuple[ModelConfig, MoETransformer]:
    torch.manual_seed(job.training.seed)  # every rank builds identical initial weights
    config = job.model.config()
    return config, MoETransformer(config)


def expert_lr_config(job: JobSpec) -> ExpertLRConfig:
    opt = job.training.optimizer
    return ExpertLRConfig(rule=opt.expert_lr_scaling, update_interval_steps=opt.expert_lr_interval_steps)


def build_optimizer(model: MoETransformer, job: JobSpec) -> ExpertAdamW:
    """AdamW with one param group per layer's routed experts, each expert at its own LR."""
    opt = job.training.optimizer
    groups = build_param_groups(model, base_lr=opt.lr, weight_decay=opt.weight_decay, expert_lr=expert_lr_config(job))
    return ExpertAdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay,
                       expert_rows=expert_rows(model))


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
    """One rank's training state (engine with its model part, optimizer, expert LRs, data) and its step."""

    def __init__(self, job: JobSpec, work: RankWork, reporter: Reporter) -> None:
        self.job, self.work, self.reporter = job, work, reporter
        self.config, model = build_model(job)
        training = job.training
        self.layout = work.resolved_layout(training.micro_batches_per_step)
        if self.layout.world_size != work.world_size:
            raise ValueError(f"layout {self.layout.describe()} has {self.layout.world_size} ranks, "
                             f"the generation {work.world_size}")
        self.faults = FaultInjector(job.faults, node=work.node, card=work.card_index, generation=work.generation)
        self.step_in_progress = 0
        self.device = torch.device(work.device)
        self.engine = build_engine(
            model.to(self.device), self.layout, world_size=work.world_size,
            micro_batches_per_step=training.micro_batches_per_step, device=self.device,
            on_enter_reduce=lambda: reporter.entered_reduce(work.generation, work.rank, self.step_in_progress),
        )  # fmt: skip
        self.model = self.engine.module  # this rank's part: what the optimizer steps and checkpoints hold
        self.optimizer = build_optimizer(self.model, job)
        self.expert_lrs = ExpertLRController(self.optimizer, expert_lr_config(job), self.engine.reduce_counts)
        self.data = build_data(job, self.config.vocab_size, Path(work.log_dir) if work.log_dir else None, work.rank)
        self.stages: list[StagePlan] = self.data.data.plans if isinstance(self.data, RealTokens) else []
        self.schedule = anneal_schedule(training.lr_schedule(), self.stages)
        self.rope_base = self.config.rope_base
        self.micro_batches = self.layout.micro_batches(work.rank)
        self.micro_batch_offset = self.layout.micro_batch_offset(work.rank)
        self.tokens_per_micro_batch = training.micro_batch * training.seq_len

    def stage(self, step: int) -> StagePlan | None:
        return self.data.data.stage(step) if self.stages else None

    def enter_stage(self, step: int) -> None:
        """The stage's sequence length and RoPE base from this step on (also right after a resume)."""
        stage = self.stage(step)
        if stage is None:
            return
        self.tokens_per_micro_batch = self.job.training.micro_batch * stage.seq_len
        base = stage.rope_base or self.config.rope_base
        if base != self.rope_base:
            self.model.set_rope_base(base)
            self.rope_base = base
            logging.getLogger("hyrun.trainer").info("stage %s from step %d: seq_len %d, rope_base %g",
                                                    stage.name, step, stage.seq_len, base)

    def stage_changes_after(self, step: int) -> bool:
        """Whether `step` ends a stage and the next one trains other shapes (a planned checkpoint)."""
        stage, after = self.stage(step), self.stage(step + 1)
        if stage is None or step >= self.job.training.steps or after is stage:
            return False
        return (after.seq_len, after.rope_base) != (stage.seq_len, stage.rope_base)

    def extra_state(self, step: int) -> dict:
        """Job-wide state beside model and optimizer that a resume needs (collective), and the model's
        shape, so that `hyrun export` can read a checkpoint without the job file."""
        return {"data_position": step + 1, "expert_lr": self.expert_lrs.state_dict(),
                "model": asdict(self.config)}

    def restore_extra(self, extra: dict) -> int:
        """Restores expert-LR state; returns the first step to train."""
        if "expert_lr" in extra:
            # Pending counts are already summed: one rank per group of ranks that sums them holds them.
            self.expert_lrs.load_state_dict(extra["expert_lr"], holds_pending=self._holds_pending())
        return int(extra.get("data_position", 1))

    def _holds_pending(self) -> bool:
        coordinate = self.layout.dims.coordinate(self.work.rank)
        return coordinate["dp"] == coordinate["cp"] == coordinate["tp"] == 0

    def tokens_reported(self) -> int:
        """Tokens this rank's replica trained on, reported by one rank of the replica only (its pp,
        cp and tp ranks see the same tokens), so the coordinator's sum counts each token once."""
        coordinate = self.layout.dims.coordinate(self.work.rank)
        if coordinate["pp"] or coordinate["cp"] or coordinate["tp"]:
            return 0
        return self.micro_batches * self.tokens_per_micro_batch

    def forward_backward(self, step: int):
        """This rank's micro-batches of `step` through its engine; returns its StepWork."""
        batches = [batch.to(self.device) for batch in self.data.micro_batches(
            step, self.micro_batch_offset, self.micro_batches, self.job.training.micro_batch)]
        return self.engine.forward_backward(batches, speed=self.faults.speed(step, self.work.speed),
                                            observe=self.expert_lrs.observe)

    def begin_step(self, step: int) -> float:
        self.step_in_progress = step
        self.enter_stage(step)
        self.faults.at_step_start(step)
        lr = lr_at(step - 1, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.begin_step(step, corrupt=self.faults.corrupts_gradients(step))
        return lr

    def apply_update(self, step: int) -> None:
        # Every rank gets the same answer, so all skip a step with a non-finite gradient together.
        if self.engine.grads_finite():
            if self.job.training.optimizer.grad_clip > 0:
                self.engine.clip_grad_norm(self.job.training.optimizer.grad_clip)
            self.optimizer.step()
        self.expert_lrs.maybe_update(step)


def start_from_export(trainer: Trainer, section: ModelSection) -> int:
    """A fresh run's weights (and, if asked, optimizer state and position) from `model.init_from`;
    returns the first step to train."""
    extra = load_export(trainer.model, trainer.optimizer, trainer.config, Path(section.init_from),
                        training_state=section.init_training_state)
    return trainer.restore_extra(extra) if extra is not None else 1


def train(
    job: JobSpec, work: RankWork, reporter: Reporter, checkpointer=None, drain: DrainRequest | None = None
) -> MoETransformer:
    """Trains this rank from the newest checkpoint (if a checkpointer is given and one exists) to
    the job's last step; returns the (unwrapped) model."""
    log = logging.getLogger("hyrun.trainer")
    trainer = Trainer(job, work, reporter)
    trainer.faults.checkpoint_dir = checkpointer.settings.directory if checkpointer is not None else None
    log.info("model and optimizer built")
    first_step, info = 1, None
    if checkpointer is not None:
        info = checkpointer.load_latest(trainer.model, trainer.optimizer)
        if info is not None:
            first_step = trainer.restore_extra(info.extra)
            log.info(
                "resumed from step %d (%s)%s", info.step, info.source,
                f"; refused newer: {'; '.join(info.refused)}" if info.refused else "",
            )  # fmt: skip
    if info is None and job.model.init_from:
        first_step = start_from_export(trainer, job.model)
    checkpoints = CheckpointReport(checkpointer, rank=work.rank, resumed=info)
    for step in range(first_step, job.training.steps + 1):
        started = time.perf_counter()
        lr = trainer.begin_step(step)
        work_done = trainer.forward_backward(step)
        if checkpointer is not None:
            checkpointer.fence()  # the last save's copy of the weights must finish before they change
        trainer.apply_update(step)
        stage_change = trainer.stage_changes_after(step)
        # due() is a vote every rank takes part in each step; a stage change is known to all alike.
        if checkpointer is not None and (checkpointer.due(step, time.monotonic()) or stage_change):
            checkpointer.save_async(step, trainer.model, trainer.optimizer, extra=trainer.extra_state(step))
            if (drain is not None and drain.take()) or stage_change:
                checkpointer.wait()
        if step == first_step:
            log.info("first step done")
        moved, spent = LEDGER.take()  # this step's collectives, by kind (empty unless the worker counts them)
        reporter.report(
            StepRecord(
                collective_bytes=moved,
                collective_s=spent,
                generation=work.generation,
                rank=work.rank,
                step=step,
                loss=work_done.ce,
                tokens=trainer.tokens_reported(),
                step_time_s=time.perf_counter() - started,
                compute_time_s=work_done.compute_s,
                comm_wait_s=work_done.comm_wait_s,
                bubble_s=work_done.bubble_s,
                grad_norm=work_done.grad_norm,
                nonfinite_grads=work_done.nonfinite,
                lr=lr,
                **checkpoints.fields(),
            )
        )
    if checkpointer is not None:
        checkpointer.close()
    return trainer.model
