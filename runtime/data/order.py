"""Which sample every global index is: a pure function of (seed, stages, source sizes, index), so any
rank of any layout, after any eviction or resume, asks for any index and gets the same answer.

Within a stage the sources are interleaved by merging their arrival times (k + 0.5) / w: after any
prefix of p samples a source of weight w has had p * w of them to within 0.5 + w * sources / 2 (half a
sample for two sources, under one for the three-source mixtures tested). A source's draws count on
across stages, and draw q of a source is sample `perm(q mod size)` of epoch q div size, where perm is
a seeded Feistel permutation computed per index: every sample of a source is
seen exactly once per epoch, and nothing of size O(source) or O(stage) is ever built."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_ROUNDS = 4


@dataclass(frozen=True)
class Stage:
    name: str
    samples: int  # global samples in this stage
    mixture: Mapping[str, float]  # weight per source (need not sum to 1; a source left out gets none)


class SampleOrder:
    def __init__(self, seed: int, stages: Sequence[Stage], source_samples: Mapping[str, int],
                 block_samples: int = 1 << 15, cached_blocks: int = 64) -> None:
        self.seed = int(seed)
        self.sources = tuple(source_samples)
        self.source_samples = np.array([int(source_samples[s]) for s in self.sources], dtype=np.int64)
        self.stages = tuple(stages)
        if not self.stages:
            raise ValueError("give at least one stage")
        self._weights = np.stack([self._stage_weights(stage) for stage in self.stages])
        lengths = np.array([stage.samples for stage in self.stages], dtype=np.int64)
        self._stage_ends = np.cumsum(lengths)
        self.total_samples = int(self._stage_ends[-1])
        self._block = int(block_samples)
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_blocks = cached_blocks
        # Draws of each source before each stage: the within-source position carries across stages.
        offsets = [np.zeros(len(self.sources), np.int64)]
        for s, stage in enumerate(self.stages):
            offsets.append(offsets[-1] + self._counts_at(s, stage.samples))
        self._offsets = np.stack(offsets)

    def _stage_weights(self, stage: Stage) -> np.ndarray:
        if stage.samples <= 0:
            raise ValueError(f"stage {stage.name}: samples {stage.samples} must be positive")
        unknown = sorted(set(stage.mixture) - set(self.sources))
        if unknown:
            raise ValueError(f"stage {stage.name}: unknown sources {', '.join(unknown)} (have: {', '.join(self.sources)})")
        weights = np.array([float(stage.mixture.get(s, 0.0)) for s in self.sources])
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"stage {stage.name}: weights {dict(stage.mixture)} must be >= 0 with a positive sum")
        empty = [s for s, w, n in zip(self.sources, weights, self.source_samples) if w > 0 and n <= 0]
        if empty:
            raise ValueError(f"stage {stage.name}: sources {', '.join(empty)} have no samples (too short for seq_len?)")
        return weights / weights.sum()

    # -- interleaving inside a stage -------------------------------------------------------------------

    def _count_before(self, s: int, t: float) -> np.ndarray:
        """Per source, how many arrivals (k + 0.5) / w fall before time t, by the same float arithmetic
        every window uses, so windows computed apart agree exactly."""
        w = self._weights[s]
        active = w > 0
        safe = np.where(active, w, 1.0)
        count = np.where(active, np.maximum(0, np.ceil(t * safe - 0.5)), 0).astype(np.int64)
        for _ in range(4):  # the estimate is off by at most one either way; settle it on the real times
            too_many = active & (count > 0) & ((count - 1 + 0.5) / safe >= t)
            too_few = active & ((count + 0.5) / safe < t)
            if not (too_many.any() or too_few.any()):
                break
            count += too_few.astype(np.int64) - too_many.astype(np.int64)
        return count

    def _window(self, s: int, first: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions [first, first + n) of stage s: (source ids, each one's draw number k in this stage),
        and the per-source counts before `first`. Only arrivals between two times bracketing the window
        are generated: O(n + sources) work, whatever `first` is."""
        sources = len(self.sources)
        t0 = max(0.0, float(first - sources - 1))  # N(t) lies within sources/2 of t (weights sum to 1)
        t1 = float(first + n + sources + 1)
        c0, c1 = self._count_before(s, t0), self._count_before(s, t1)
        ids = np.repeat(np.arange(sources, dtype=np.int32), c1 - c0)
        k = np.arange(len(ids), dtype=np.int64) - np.repeat(np.cumsum(c1 - c0) - (c1 - c0) - c0, c1 - c0)
        times = (k + 0.5) / self._weights[s][ids]
        merged = np.lexsort((ids, times))  # by time, ties to the lower source id; stable: k ascending
        skip = first - int(c0.sum())
        before = c0 + np.bincount(ids[merged[:skip]], minlength=sources)
        chosen = merged[skip:skip + n]
        if skip < 0 or len(chosen) != n:
            raise AssertionError(f"window [{first}, {first + n}) of stage {s} not bracketed")  # a bug, not input
        return ids[chosen], k[chosen], before

    def _counts_at(self, s: int, position: int) -> np.ndarray:
        return self._window(s, position, 0)[2]

    def _block_of(self, s: int, block: int) -> tuple[np.ndarray, np.ndarray]:
        key = (s, block)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        first = block * self._block
        n = min(self._block, self.stages[s].samples - first)
        ids, k, _ = self._window(s, first, n)
        self._cache[key] = (ids, k)
        if len(self._cache) > self._cached_blocks:
            self._cache.popitem(last=False)
        return ids, k

    # -- the public function ---------------------------------------------------------------------------

    def draws(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id, the source's draw number q counted from the first stage) for each global index."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= self.total_samples):
            raise IndexError(f"global sample indices must be in [0, {self.total_samples})")
        stage = np.searchsorted(self._stage_ends, index, side="right")
        position = index - np.concatenate([[0], self._stage_ends])[stage]
        block = position // self._block
        ids = np.empty(len(index), np.int32)
        k = np.empty(len(index), np.int64)
        for rows in _groups(stage * (self.total_samples // self._block + 2) + block):
            s, b = int(stage[rows[0]]), int(block[rows[0]])
            block_ids, block_k = self._block_of(s, b)
            within = position[rows] - b * self._block
            ids[rows], k[rows] = block_ids[within], block_k[within]
        return ids, self._offsets[stage, ids] + k

    def lookup(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source id into `self.sources`, sample index within that source) for each global index."""
        ids, q = self.draws(indices)
        sizes = self.source_samples[ids]
        epoch, rank = q // sizes, q % sizes
        samples = np.empty(len(q), np.int64)
        for rows in _groups(ids.astype(np.int64) * (int(epoch.max(initial=0)) + 1) + epoch):
            j, e = int(ids[rows[0]]), int(epoch[rows[0]])
            samples[rows] = permute(rank[rows], int(sizes[rows[0]]), epoch_keys(self.seed, self.sources[j], e))
        return ids, samples

    def __call__(self, index: int) -> tuple[str, int]:
        ids, samples = self.lookup([index])
        return self.sources[int(ids[0])], int(samples[0])

    def stage_of(self, index: int) -> Stage:
        if not 0 <= index < self.total_samples:
            raise IndexError(f"global sample index {index} not in [0, {self.total_samples})")
        return self.stages[int(np.searchsorted(self._stage_ends, index, side="right"))]


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Row numbers of each distinct key (one sort, not one pass per key)."""
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    return np.split(order, cuts) if len(order) else []


def epoch_keys(seed: int, source: str, epoch: int) -> np.ndarray:
    """Round keys of one source's permutation in one epoch. Keyed by the source's name, not its position,
    so adding a source does not reshuffle the others."""
    digest = hashlib.blake2b(f"hyrun-order/{seed}/{source}/{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    # splitmix64's finalizer: a cheap, well-mixed round function (uint64 arithmetic wraps as intended).
    z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(rank: np.ndarray, size: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of [0, size) applied to `rank`: a balanced Feistel network on the next even power of
    two, re-applied to values that land outside [0, size) (cycle walking; under 4 rounds on average)."""
    half = max(1, math.ceil(max(1, (size - 1).bit_length()) / 2))
    mask = np.uint64((1 << half) - 1)
    value = np.asarray(rank, dtype=np.uint64).copy()
    todo = np.ones(len(value), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            left, right = value[todo] >> np.uint64(half), value[todo] & mask
            for key in keys:
                left, right = right, left ^ (_mix(right, key) & mask)
            value[todo] = (left << np.uint64(half)) | right
            todo[todo] = value[todo] >= np.uint64(size)
    return value.astype(np.int64)
