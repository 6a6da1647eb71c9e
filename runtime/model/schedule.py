"""The learning-rate schedule: linear warmup, cosine (or linear) decay, then a final anneal to 1/10 of
the peak over the last 5% of steps (the three phases of Hunyuan-Large's pre-training)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"  # "cosine" | "linear"
    decay_end_ratio: float = 0.3  # LR at the end of the decay phase, as a fraction of peak
    anneal_fraction: float = 0.05  # share of total_steps spent in the final anneal
    anneal_end_ratio: float = 0.1  # LR at the last step, as a fraction of peak

    def __post_init__(self) -> None:
        if self.peak_lr <= 0:
            raise ValueError(f"peak_lr={self.peak_lr} must be > 0")
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay={self.decay!r} must be 'cosine' or 'linear'")
        if not 0 <= self.anneal_fraction < 1:
            raise ValueError(f"anneal_fraction={self.anneal_fraction} must lie in [0, 1)")
        if not 0 <= self.warmup_steps <= self.anneal_start_step:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, {self.anneal_start_step}] "
                             f"(the anneal starts at step {self.anneal_start_step} of {self.total_steps})")
        if not 0 <= self.anneal_end_ratio <= self.decay_end_ratio <= 1:
            raise ValueError(f"need 0 <= anneal_end_ratio ({self.anneal_end_ratio}) <= decay_end_ratio "
                             f"({self.decay_end_ratio}) <= 1")

    @property
    def anneal_start_step(self) -> int:
        return self.total_steps - round(self.total_steps * self.anneal_fraction)


def lr_at(step: int, schedule: LRSchedule) -> float:
    """LR for optimizer step `step` (0-based); steps past the end stay at the final LR."""
    peak = schedule.peak_lr
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    anneal_start = schedule.anneal_start_step
    decay_end = peak * schedule.decay_end_ratio
    if step < anneal_start:
        progress = (step - schedule.warmup_steps) / max(anneal_start - schedule.warmup_steps, 1)
        if schedule.decay == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1 - progress
        return decay_end + (peak - decay_end) * shape
    anneal_steps = schedule.total_steps - anneal_start
    progress = min((step - anneal_start + 1) / max(anneal_steps, 1), 1.0)
    final = peak * schedule.anneal_end_ratio
    return decay_end + (final - decay_end) * progress
