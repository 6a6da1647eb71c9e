"""Global sample indices → packed token windows: a `SampleOrder` over a prepared corpus's sources, read
through `TokenShards`. What a worker asks for its micro-batch, whatever its rank and layout: the indices
it owns, nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .order import SampleOrder, Stage
from .shards import TokenShards
from .sources import DataError


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # int64 [n, seq_len + 1]: inputs [:, :-1], targets [:, 1:]
    segment_ids: np.ndarray  # int32 [n, seq_len + 1]: attention stays where these are equal
    sources: np.ndarray  # int32 [n]: index into `PackedLoader.sources`
    samples: np.ndarray  # int64 [n]: the sample within its source


class PackedLoader:
    def __init__(self, shards: TokenShards, seed: int, stages: Sequence[Stage], seq_len: int) -> None:
        self.shards = shards
        self.seq_len = seq_len
        sizes = shards.num_samples(seq_len)
        used = {name for stage in stages for name, weight in stage.mixture.items() if weight > 0}
        missing = sorted(used - set(sizes))
        if missing:
            raise DataError(f"stages use sources {', '.join(missing)} that {shards.directory} does not hold "
                            f"(it has: {', '.join(sizes)})")
        self.order = SampleOrder(seed, stages, sizes)

    @classmethod
    def open(cls, directory: Path | str, seed: int, stages: Sequence[Stage], seq_len: int,
             split: str = "train") -> PackedLoader:
        return cls(TokenShards(directory, split), seed, stages, seq_len)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.order.sources

    def batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        ids, samples = self.order.lookup(indices)
        tokens = np.empty((len(ids), self.seq_len + 1), np.int64)
        segments = np.empty((len(ids), self.seq_len + 1), np.int32)
        for row, (j, sample) in enumerate(zip(ids.tolist(), samples.tolist())):
            packed = self.shards.sample(self.sources[j], sample, self.seq_len)
            tokens[row], segments[row] = packed.tokens, packed.segment_ids()
        return Batch(tokens, segments, ids, samples)
