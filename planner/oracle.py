"""Exhaustive enumeration, for checking the search on small clusters (up to about 8 cards): every degree
tuple, every subset of blocks, every distinct layout of them on the grid, and every layer split, costed
by the same `evaluate` the search uses. Micro-batches and experts use the same exact allocators.

Blocks that share a node and a card type are interchangeable, so layouts are enumerated over block
classes and deduplicated up to the symmetries of the cost model (replica groups may be permuted; within
an expert group column order matters, because one expert placement serves all groups).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Iterator

import numpy as np

from .allocate import compositions
from .cluster import Cluster
from .assemble import build_plan
from .evaluate import evaluate, evaluate_batch, grid_context, model_tables
from .layout import BlockTable, form_blocks
from .model_cost import ModelShape
from .plan import Degrees, Plan
from .space import DegreeConstraints, cp_options, ep_options, tp_options
from .training import TrainingConfig


def _block_classes(table: BlockTable) -> list[int]:
    keys = [(b.node, b.spec_name, b.flops_per_s, b.memory_bytes, b.memory_bandwidth_bytes_per_s,
             b.intra_node_bandwidth_bytes_per_s, b.inter_node_bandwidth_bytes_per_s, b.collective_latency_s)
            for b in table.blocks]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return [index[key] for key in keys]


def _multiset_permutations(counts: Counter) -> Iterator[tuple[int, ...]]:
    total = sum(counts.values())
    if total == 0:
        yield ()
        return
    for item in sorted(counts):
        if counts[item]:
            counts[item] -= 1
            for rest in _multiset_permutations(counts):
                yield (item, *rest)
            counts[item] += 1


def _layouts(classes: list[int], pp: int, dp: int, g: int) -> Iterator[np.ndarray]:
    """Distinct (pp, dp) grids of class ids, for every multiset of pp*dp blocks."""
    available = Counter(classes)
    kinds = sorted(available)
    for take in itertools.product(*(range(available[k] + 1) for k in kinds)):
        if sum(take) != pp * dp:
            continue
        seen = set()
        for flat in _multiset_permutations(Counter(dict(zip(kinds, take)))):
            grid = np.array(flat, dtype=np.int64).reshape(pp, dp)
            columns = [tuple(grid[:, r]) for r in range(dp)]
            groups = sorted(tuple(columns[i:i + g]) for i in range(0, dp, g))
            key = tuple(groups)
            if key not in seen:
                seen.add(key)
                yield grid


def oracle_search(cluster: Cluster, model: ModelShape, training: TrainingConfig, *,
                  constraints: DegreeConstraints | None = None) -> Plan:
    """The best plan over everything the search could choose. Slow by design; small clusters only."""
    constraints = constraints or DegreeConstraints()
    tables = model_tables(model, training)
    cards = {card.global_id: card for card in cluster.cards}
    per_node = max(len(c) for c in cluster.cards_by_node().values())
    best = None
    for tp in tp_options(model, per_node, constraints):
        for cp in cp_options(model, per_node // tp, constraints):
            blocks = form_blocks(cluster, cp * tp)
            if not blocks:
                continue
            table = BlockTable.of(blocks)
            classes = _block_classes(table)
            members = {c: [i for i, k in enumerate(classes) if k == c] for c in set(classes)}
            for pp in range(1, min(model.num_layers, constraints.max_pp, len(blocks)) + 1):
                for ep in ep_options(model, cp, constraints):
                    g = max(1, ep // cp)
                    for dp in range(g, len(blocks) // pp + 1, g):
                        if not (constraints.allows("pp", pp) and constraints.allows("dp", dp)) \
                                or tables.micro_batches % g or tables.micro_batches < dp:
                            continue
                        degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp, ep=ep)
                        splits = np.array(list(compositions(model.num_layers, pp)), dtype=np.int64)
                        for class_grid in _layouts(classes, pp, dp, g):
                            ctx = grid_context(tables, degrees, table, _concrete(class_grid, members))
                            times, feasible = evaluate_batch(ctx, splits)
                            times = np.where(feasible, times, np.inf)
                            i = int(np.argmin(times))
                            if np.isfinite(times[i]) and (best is None or times[i] < best[0]):
                                best = (float(times[i]), ctx, tuple(int(x) for x in splits[i]))
    if best is None:
        raise ValueError("no layout fits (oracle)")
    _, ctx, split = best
    return build_plan(ctx, evaluate(ctx, split), cards, label="oracle")


def _concrete(class_grid: np.ndarray, members: dict[int, list[int]]) -> np.ndarray:
    """Class ids → block indices: the k-th use of a class takes its k-th block."""
    used: Counter = Counter()
    grid = np.empty_like(class_grid)
    for position, cls in np.ndenumerate(class_grid):
        grid[position] = members[int(cls)][used[int(cls)]]
        used[int(cls)] += 1
    return grid
