"""Exact integer splits the search relies on: micro-batches over replicas, experts over expert-parallel
ranks, and layers over pipeline stages. Each is a small pure function with a proof sketch, so the
search can be heuristic only where it must be (which cards go where), never in these inner splits.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from typing import Iterator, Sequence

import numpy as np


def allocate_units(total: int, per_unit_s, fixed_s=0.0, *, minimum: int = 1) -> np.ndarray:
    """Split `total` identical units (micro-batches, experts) over workers so the latest finish time
    `fixed_s + units * per_unit_s` is as early as possible, each worker getting at least `minimum`.

    Exact: the optimum takes, besides the forced units, the smallest of all workers' next finish times
    (the values b + a*m form increasing sequences, so the best maximum is the total-th smallest of
    their union). We start from the continuous solution's floor, add or remove units to hit `total`,
    then swap any selected unit that finishes later than an unselected one. Ties go to lower indices.
    """
    a = np.asarray(per_unit_s, dtype=np.float64)
    b = np.broadcast_to(np.asarray(fixed_s, dtype=np.float64), a.shape)
    n = a.size
    if n == 0 or total < minimum * n:
        raise ValueError(f"cannot give {n} workers at least {minimum} of {total} units each")
    inverse = 1.0 / a
    threshold = (total + float((b * inverse).sum())) / float(inverse.sum())
    units = np.maximum(np.floor((threshold - b) * inverse), minimum).astype(np.int64)
    short = total - int(units.sum())
    if short > 0:
        order = np.argsort(b + a * (units + 1), kind="stable")
        units[order[:min(short, n)]] += 1
    elif short < 0:
        removable = np.where(units > minimum, b + a * units, -np.inf)
        order = np.argsort(-removable, kind="stable")
        units[order[:min(-short, int((units > minimum).sum()))]] -= 1
    # Fix-ups: rarely more than a handful of iterations, each O(n).
    while (short := total - int(units.sum())) != 0:
        if short > 0:
            units[int(np.argmin(b + a * (units + 1)))] += 1
        else:
            units[int(np.argmax(np.where(units > minimum, b + a * units, -np.inf)))] -= 1
    while True:
        selected = np.where(units > minimum, b + a * units, -np.inf)
        giver, taker = int(np.argmax(selected)), int(np.argmin(b + a * (units + 1)))
        if giver == taker or not selected[giver] > (b[taker] + a[taker] * (units[taker] + 1)) * (1 + 1e-12):
            return units
        units[giver] -= 1
        units[taker] += 1


def place_experts(num_experts: int, position_speeds: Sequence[float]) -> np.ndarray:
    """Experts per expert-parallel position, in proportion to each position's speed (at least one
    each): minimizes the slowest position's expert time, so the all-to-all's combine does not wait on
    a slow card holding as many experts as a fast one."""
    return np.array(_place_experts(int(num_experts), tuple(float(v) for v in position_speeds)), dtype=np.int64)


@functools.lru_cache(maxsize=4096)
def _place_experts(num_experts: int, speeds: tuple[float, ...]) -> tuple[int, ...]:
    # Every stage of every layout asks this; most stages are uniform, and the rest repeat a lot.
    if len(set(speeds)) == 1:
        return even_split(num_experts, len(speeds))
    return tuple(int(n) for n in allocate_units(num_experts, 1.0 / np.asarray(speeds), minimum=1))


def contiguous_owners(counts: Sequence[int]) -> tuple[int, ...]:
    """[2, 1, 3] → (0, 0, 1, 2, 2, 2): experts numbered in order, each position owning a run."""
    return tuple(owner for owner, count in enumerate(counts) for _ in range(int(count)))


# Relative precision of the bisection: splits whose bottlenecks differ by less are taken as equal.
SPLIT_TOLERANCE = 1e-7


def split_layers(layer_cost, stage_extra_cost, stage_speed, layer_memory_bytes, stage_fixed_memory_bytes,
                 stage_capacity_bytes) -> tuple[int, ...] | None:
    """Contiguous layers per stage minimizing max over stages of (cost of its layers + extra) / speed,
    with every stage within its memory. None when no split fits.

    `layer_cost` (L,), `stage_*` (pp,), `layer_memory_bytes` (pp, L): what layer l costs in memory if
    stage s holds it (stages keep different numbers of micro-batches in flight). Exact up to the
    bisection tolerance: for a target time T, filling each stage greedily as far as time and memory
    allow is feasible iff any split is (both limits grow with the layers taken).
    """
    cost = [0.0] + list(itertools.accumulate(float(c) for c in layer_cost))
    num_layers, pp = len(cost) - 1, len(stage_speed)
    if pp > num_layers:
        return None
    memory = np.concatenate([np.zeros((pp, 1)), np.cumsum(layer_memory_bytes, axis=1)], axis=1).tolist()
    speed = [float(x) for x in stage_speed]
    extra = [float(x) for x in stage_extra_cost]
    room = [float(c) - float(f) for c, f in zip(stage_capacity_bytes, stage_fixed_memory_bytes)]

    find = bisect.bisect_right  # the walk runs thousands of times per search: keep it lean
    stages = list(zip(range(pp), speed, extra, memory, room, [num_layers - (pp - 1 - s) for s in range(pp)]))

    def walk(target: float) -> list[int] | None:
        """Each stage takes as many layers as time and memory allow; None if layers are left over."""
        bounds, start = [0], 0
        for s, v, e, held, r, last in stages:
            end = find(cost, cost[start] + target * v - e) - 1
            by_memory = find(held, held[start] + r) - 1
            if by_memory < end:
                end = by_memory
            if s == pp - 1:
                if end < num_layers:
                    return None
            elif end > last:
                end = last
            if end <= start:
                return None
            bounds.append(end)
            start = end
        return bounds

    def bottleneck(bounds: list[int]) -> float:
        return max((cost[bounds[s + 1]] - cost[bounds[s]] + extra[s]) / speed[s] for s in range(pp))

    best = walk(np.inf)
    if best is None or pp == 1:
        return None if best is None else (num_layers,)
    # Bisect on the target time; every feasible walk snaps the upper end down to the bottleneck its
    # split actually reaches, so the search closes on the optimum in a few steps.
    low = (cost[-1] + sum(extra)) / sum(speed)  # perfectly balanced: nothing can beat it
    high = bottleneck(best)
    for _ in range(200):
        if high - low <= SPLIT_TOLERANCE * high:
            break
        bounds = walk((low + high) / 2)
        if bounds is None:
            low = (low + high) / 2
        else:
            best, high = bounds, bottleneck(bounds)
    return tuple(best[s + 1] - best[s] for s in range(pp))


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as `parts` positive ints in order (the oracle's layer splits)."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *cuts, total)
        yield tuple(edges[i + 1] - edges[i] for i in range(parts))


def even_split(total: int, parts: int) -> tuple[int, ...]:
    """As even as possible, the remainder to the first parts (what a homogeneous framework does)."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))
