"""A job's real data as its ranks read it: step and row in, packed token windows out, through one
`PackedLoader` per sequence length. Row r of step s is global sample (s - 1) · global_batch + r, a
pure function of (seed, stages, index) whatever rank or layout asks for it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .loader import Batch, PackedLoader
from .order import Stage
from .shards import TokenShards
from .spec import DataSection, StagePlan, plan_stages, stage_of
from .sources import DataError


@dataclass(frozen=True)
class StepRows:
    batch: Batch
    indices: np.ndarray  # int64 global sample indices of the rows
    stage: StagePlan


def default_mixture(data: DataSection, sizes: Mapping[str, int]) -> dict[str, float]:
    """The data section's mixture, or every source in proportion to its samples (one epoch of each)."""
    return dict(data.mixture) if data.mixture else {name: float(n) for name, n in sizes.items() if n > 0}


class JobData:
    def __init__(self, data: DataSection, *, steps: int, global_batch: int, seq_len: int, seed: int,
                 directory: Path | None = None) -> None:
        self.data = data
        self.global_batch = global_batch
        self.directory = Path(directory or data.directory())
        self.shards = TokenShards(self.directory, "train")
        self.plans = plan_stages(data, steps=steps, seq_len=seq_len)
        self.seed = data.seed if data.seed is not None else seed
        self._loaders: dict[int, PackedLoader] = {}
        self._skipped: dict[str, int] = {}  # per stage: samples of earlier stages read by another loader
        for length in sorted({p.seq_len for p in self.plans}):
            group = [p for p in self.plans if p.seq_len == length]
            sizes = self.shards.num_samples(length)
            stages = [Stage(p.name, p.steps * global_batch, p.mixture or default_mixture(data, sizes)) for p in group]
            try:
                self._loaders[length] = PackedLoader(self.shards, self.seed, stages, length)
            except ValueError as error:
                raise DataError(f"{self.directory}: {error}") from None
            for p in group:
                self._skipped[p.name] = sum(q.steps for q in self.plans if q.seq_len != length
                                            and q.first_step < p.first_step) * global_batch

    @property
    def vocab_size(self) -> int:
        return self.shards.vocab_size

    def stage(self, step: int) -> StagePlan:
        return stage_of(self.plans, step)

    def sources(self, step: int) -> tuple[str, ...]:
        return self._loaders[self.stage(step).seq_len].sources

    def rows(self, step: int, first_row: int, count: int) -> StepRows:
        """Rows [first_row, first_row + count) of step `step`'s global batch."""
        stage = self.stage(step)
        indices = (step - 1) * self.global_batch + first_row + np.arange(count, dtype=np.int64)
        loader = self._loaders[stage.seq_len]
        return StepRows(loader.batch(indices - self._skipped[stage.name]), indices, stage)


def validation_batch(shards: TokenShards, source: str, seq_len: int, count: int) -> Batch | None:
    """The first `count` packed windows of a source's held-out split (the same every evaluation), or
    None when the split is shorter than one window."""
    tokens = shards.source(source)
    n = min(count, tokens.num_samples(seq_len))
    if n == 0:
        return None
    samples = [tokens.sample(i, seq_len) for i in range(n)]
    return Batch(np.stack([s.tokens for s in samples]), np.stack([s.segment_ids() for s in samples]),
                 np.zeros(n, np.int32), np.arange(n, dtype=np.int64))
