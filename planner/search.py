"""The search: which degrees, which cards in which (stage, replica) cell, how many layers per stage and
micro-batches per replica. `search` returns the best plan, runner-ups with other degrees, and the naive
plan (uniform split, cards in id order) costed by the same model; `replan` is the search without some
cards, for evictions.

How it stays fast: the inner splits (layers, micro-batches, experts) are exact and cheap (allocate.py);
the heuristic part is only where cards go, and there it tries a handful of layouts (layout.py). Three
passes: (1) every degree tuple with a few layouts, after pruning tuples that cannot fit in memory;
(2) more layouts for the most promising tuples; (3) local moves of the layer split for the finalists.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from . import cost
from .allocate import split_layers
from .assemble import build_plan
from .cards import GIB
from .cluster import Cluster
from .evaluate import GridContext, ModelTables, evaluate, evaluate_batch, grid_context, model_tables, split_inputs
from .layout import BlockTable, block_selections, candidate_grids, form_blocks
from .model_cost import ModelShape
from .naive import naive_plan
from .plan import Degrees, Plan
from .space import (DATA_PARALLEL_ONLY, DegreeConstraints, cp_options, dp_options, ep_options,
                    memory_lower_bound_bytes, tp_options)
from .training import TrainingConfig

__all__ = ["DATA_PARALLEL_ONLY", "DegreeConstraints", "SearchResult", "naive_plan", "replan", "search"]

# Pass 2 takes degree tuples in pass-1 order and searches each fully (both block selections, every
# stage order of short pipelines, exact layer splits) until it has costed this many layouts, and at
# least PASS_TWO_MIN_TUPLES tuples; then the leading tuples' other dp widths if budget is left. Small
# clusters (SMALL_CLUSTER_CARDS) have no budget: every tuple and every dp width gets the full search.
PASS_TWO_LAYOUTS = 300
PASS_TWO_MIN_TUPLES = 4
# Finalists whose layer split is refined by local moves in pass 3. On small clusters, where one card
# matters, the leading SWAP_REFINED_LAYOUTS of them and the best layout of each of the leading
# SWAP_REFINED_DEGREES degree tuples then also try single-block moves, and every dp width is tried.
REFINED_FINALISTS = 32
SWAP_REFINED_LAYOUTS = 12
SWAP_REFINED_DEGREES = 8
SMALL_CLUSTER_CARDS = 16
SWAP_REFINE_MAX_ROUNDS = 4
SWAP_REFINE_BUDGET = 500  # layouts costed by all block moves together


@dataclass(frozen=True)
class SearchResult:
    best: Plan
    runner_ups: tuple[Plan, ...]
    naive: Plan | None
    cluster: Cluster  # the cards searched over (exclusions applied)

    @property
    def speedup_vs_naive(self) -> float | None:
        return None if self.naive is None else self.naive.step_time_s / self.best.step_time_s


@dataclass(frozen=True)
class _Candidate:
    step_time_s: float
    order: int  # enumeration index: equal times resolve the same way every run
    ctx: GridContext
    layers_per_stage: tuple[int, ...]

    @property
    def key(self) -> tuple[float, int]:
        return (self.step_time_s, self.order)


def _speed_candidates(ctx: GridContext) -> list[np.ndarray]:
    """Stage speeds to split layers by: the slowest group (every replica keeps pace), the mean, and
    the harmonic mean (what a replica of mixed cells sustains). One when every stage is uniform."""
    flops = ctx.slowest_flops
    slowest = flops.min(axis=1)
    if np.array_equal(slowest, flops.max(axis=1)):
        return [slowest]
    return [slowest, flops.mean(axis=1), flops.shape[1] / (1.0 / flops).sum(axis=1)]


def _best_split(ctx: GridContext) -> tuple[float, tuple[int, ...]] | None:
    """(step time, split): exact proportional splits (within memory) for each candidate stage speed,
    the best of them."""
    inputs = split_inputs(ctx)
    splits = {split for speeds in _speed_candidates(ctx)
              if (split := split_layers(stage_speed=speeds, **inputs)) is not None}
    return _best_of(ctx, sorted(splits))


def _best_of(ctx: GridContext, splits: list[tuple[int, ...]]) -> tuple[float, tuple[int, ...]] | None:
    """The fastest feasible split among `splits` (first one on ties) and its step time."""
    if not splits:
        return None
    times, feasible = evaluate_batch(ctx, splits)
    times = np.where(feasible, times, np.inf)
    best = int(np.argmin(times))
    return (float(times[best]), tuple(splits[best])) if np.isfinite(times[best]) else None


def _refine(candidate: _Candidate, max_sweeps: int = 64) -> _Candidate:
    """Move one layer across one stage boundary while that helps (communication and the embedding /
    head ends are not in the proportional split's cost, so the optimum can sit a layer away)."""
    for _ in range(max_sweeps):
        layers = list(candidate.layers_per_stage)
        moves = []
        for boundary in range(len(layers) - 1):
            for step in (1, -1):
                moved = layers.copy()
                moved[boundary] += step
                moved[boundary + 1] -= step
                if min(moved) >= 1:
                    moves.append(tuple(moved))
        trial = _best_of(candidate.ctx, moves)
        if trial is None or not trial[0] < candidate.step_time_s * (1 - 1e-12):
            return candidate
        candidate = dataclasses.replace(candidate, step_time_s=trial[0], layers_per_stage=trial[1])
    return candidate


def _block_class(table: BlockTable, index: int) -> tuple:
    """What the cost model sees of a block: blocks of one class are interchangeable."""
    b = table.blocks[index]
    return (b.node, b.spec_name, b.flops_per_s, b.memory_bytes, b.memory_bandwidth_bytes_per_s)


def _neighbours(grid: np.ndarray, table: BlockTable) -> Iterator[np.ndarray]:
    """Grids one move away: two cells swap blocks, a cell takes an unused block, or two stages swap."""
    cells = list(np.ndindex(grid.shape))
    used = set(grid.ravel().tolist())
    unused = [i for i in range(len(table.blocks)) if i not in used]
    for a, b in itertools.combinations(cells, 2):
        if _block_class(table, grid[a]) != _block_class(table, grid[b]):
            trial = grid.copy()
            trial[a], trial[b] = grid[b], grid[a]
            yield trial
    for a in cells:
        for block in unused:
            if _block_class(table, grid[a]) != _block_class(table, block):
                trial = grid.copy()
                trial[a] = block
                yield trial
    for first, second in itertools.combinations(range(grid.shape[0]), 2):
        order = list(range(grid.shape[0]))
        order[first], order[second] = second, first
        yield grid[order]


def _swap_refine(candidate: _Candidate, budget: int) -> tuple[_Candidate, int]:
    """Take the best neighbouring layout (see `_neighbours`, each with its own best
    layer split) while one is better, costing at most `budget` layouts; returns the result and the
    layouts costed. The layouts tried before are regular patterns; the best of them is often one move
    from a better mix (say, the card with more memory moved to the stage that holds more micro-batches).
    """
    table, spent = candidate.ctx.table, 0
    for _ in range(SWAP_REFINE_MAX_ROUNDS):
        best, seen = candidate, set()
        for trial in _neighbours(candidate.ctx.grid, table):
            key = tuple(_block_class(table, i) for i in trial.ravel())
            if key in seen:
                continue
            if spent >= budget:
                return best, spent
            seen.add(key)
            spent += 1
            ctx = grid_context(candidate.ctx.tables, candidate.ctx.degrees, table, trial)
            found = _best_split(ctx)
            if found is not None and found[0] < best.step_time_s * (1 - 1e-12):
                best = _refine(_Candidate(found[0], candidate.order, ctx, found[1]))
        if best is candidate:
            break
        candidate = best
    return candidate, spent


def _tuples(cluster: Cluster, tables: ModelTables, constraints: DegreeConstraints
            ) -> Iterator[tuple[int, int, BlockTable, int, int]]:
    """(tp, cp, blocks, pp, ep) in a fixed order."""
    shape = tables.shape
    per_node = max(len(cards) for cards in cluster.cards_by_node().values())
    for tp in tp_options(shape, per_node, constraints):
        for cp in cp_options(shape, per_node // tp, constraints):
            blocks = form_blocks(cluster, cp * tp)
            if not blocks:
                continue
            table = BlockTable.of(blocks)
            for pp in range(1, min(shape.num_layers, constraints.max_pp, len(blocks)) + 1):
                if not constraints.allows("pp", pp):
                    continue
                for ep in ep_options(shape, cp, constraints):
                    yield tp, cp, table, pp, ep


@dataclass
class _Shortfall:
    """The smallest memory any layout needs, for the error when nothing fits."""

    need_bytes: float = math.inf
    degrees: Degrees | None = None

    def note(self, need: float, degrees: Degrees) -> None:
        if need < self.need_bytes:
            self.need_bytes, self.degrees = need, degrees


def _search_candidates(cluster: Cluster, tables: ModelTables, constraints: DegreeConstraints) -> list[_Candidate]:
    shortfall, largest = _Shortfall(), max(card.spec.memory_bytes for card in cluster.cards)
    small = len(cluster) <= SMALL_CLUSTER_CARDS  # one card matters: try every width and block moves
    first_pass: list[tuple[float, int, tuple]] = []
    counter = 0
    for tp, cp, table, pp, ep in _tuples(cluster, tables, constraints):
        g = max(1, ep // cp)
        usable = cost.usable_memory_bytes(float(table.memory_bytes.max()))
        options = []
        for dp in dp_options(table, pp, g, tables.micro_batches, constraints, every_width=small):
            degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp, ep=ep)
            need = memory_lower_bound_bytes(tables, degrees)
            shortfall.note(need, degrees)
            if need <= usable:
                options.append(degrees)
        # Pass 1 scores a tuple by its first dp option that fits (all blocks, else fewer tiers).
        score, scored = math.inf, None
        for degrees in options:
            chosen = block_selections(table, pp * degrees.dp)[0]
            for grid in candidate_grids(table, chosen, pp, degrees.dp, thorough=False):
                found = _best_split(grid_context(tables, degrees, table, grid))
                if found is not None:
                    score = min(score, found[0])
            if score < math.inf:
                scored = degrees
                break
        if options:
            counter += 1
            first_pass.append((score, counter, scored or options[0], [d for d in options if d != scored], table))
    if not first_pass:
        raise _no_fit_error(tables, shortfall, largest, constraints)
    first_pass.sort(key=lambda item: item[:2])
    # Pass 2 queue: each tuple's scored option in pass-1 order, then the other dp widths of the
    # leading tuples (those that drop a slow tier), while the budget lasts.
    queue = [(degrees, table) for _, _, degrees, _, table in first_pass]
    leading = first_pass if small else first_pass[:PASS_TWO_MIN_TUPLES]
    queue += [(degrees, table) for _, _, _, others, table in leading for degrees in others]
    budget = math.inf if small else PASS_TWO_LAYOUTS
    candidates: list[_Candidate] = []
    layouts = 0
    for rank, (degrees, table) in enumerate(queue):
        if (layouts >= budget and rank >= PASS_TWO_MIN_TUPLES) and candidates:
            break
        for chosen in block_selections(table, degrees.pp * degrees.dp):
            for grid in candidate_grids(table, chosen, degrees.pp, degrees.dp):
                ctx = grid_context(tables, degrees, table, grid)
                found = _best_split(ctx)
                counter += 1
                layouts += 1
                if found is not None:
                    candidates.append(_Candidate(found[0], counter, ctx, found[1]))
    if not candidates:
        raise _no_fit_error(tables, shortfall, largest, constraints)
    candidates.sort(key=lambda c: c.key)
    refined = sorted([_refine(candidate) for candidate in candidates[:REFINED_FINALISTS]], key=lambda c: c.key)
    # Swaps start from the best layout of each of the leading degree tuples.
    # Swaps start from the leading layouts, and from the best layout of each leading degree tuple.
    starts = set(range(min(len(refined), SWAP_REFINED_LAYOUTS)))
    firsts: dict[Degrees, int] = {}
    for index, candidate in enumerate(refined):
        firsts.setdefault(candidate.ctx.degrees, index)
    starts |= set(list(firsts.values())[:SWAP_REFINED_DEGREES])
    swapped, budget = [], SWAP_REFINE_BUDGET if small else 0
    for index, candidate in enumerate(refined):
        if index in starts and budget > 0:
            candidate, spent = _swap_refine(candidate, budget)
            budget -= spent
        swapped.append(candidate)
    return sorted(swapped + candidates[REFINED_FINALISTS:], key=lambda c: c.key)


def _no_fit_error(tables: ModelTables, shortfall: _Shortfall, largest_bytes: int,
                  constraints: DegreeConstraints) -> ValueError:
    if shortfall.degrees is None:
        fixed = ", ".join(f"{name}={getattr(constraints, name)}" for name in ("pp", "dp", "cp", "tp", "ep")
                          if getattr(constraints, name) is not None)
        return ValueError(
            f"no layout is possible{f' with {fixed}' if fixed else ''}: the degrees must divide the model "
            f"(heads, FFN width, experts, sequence length) and the cluster's nodes, and the "
            f"{tables.micro_batches} micro-batches per step must give every data-parallel replica one; "
            "relax the fixed degrees, raise the global batch or lower micro_batch_size")
    usable = cost.usable_memory_bytes(largest_bytes)
    hints = "a smaller micro_batch_size" if tables.training.recompute else "recompute=True, a smaller micro_batch_size"
    if shortfall.need_bytes > usable:
        short = (f"the smallest layout ({shortfall.degrees.describe()}) needs {shortfall.need_bytes / GIB:.1f} GiB "
                 f"per card, the largest card has {largest_bytes / GIB:.1f} GiB ({usable / GIB:.1f} GiB usable)")
    else:
        short = (f"on average the smallest layout ({shortfall.degrees.describe()}) needs "
                 f"{shortfall.need_bytes / GIB:.1f} GiB per card, but no split of the layers keeps every stage "
                 f"within its own cards (largest card {largest_bytes / GIB:.1f} GiB, {usable / GIB:.1f} GiB usable)")
    return ValueError(f"no layout fits in memory: {short}; try {hints}, or more cards")


def search(cluster: Cluster, model: ModelShape, training: TrainingConfig, *, excluded: Iterable[int] = frozenset(),
           top_n: int = 3, constraints: DegreeConstraints | None = None,
           include_naive: bool = True) -> SearchResult:
    """The best plan, up to top_n - 1 runner-ups with other degrees, and the naive plan."""
    if top_n < 1:
        raise ValueError(f"top_n={top_n} must be >= 1")
    constraints = constraints or DegreeConstraints()
    cluster = cluster.without(excluded)
    tables = model_tables(model, training)
    cards = {card.global_id: card for card in cluster.cards}
    plans, seen = [], set()
    for candidate in _search_candidates(cluster, tables, constraints):
        if candidate.ctx.degrees in seen:
            continue
        seen.add(candidate.ctx.degrees)
        result = evaluate(candidate.ctx, candidate.layers_per_stage)
        plans.append(build_plan(candidate.ctx, result, cards, label="searched"))
        if len(plans) == top_n:
            break
    naive = naive_plan(cluster, model, training, constraints=constraints) if include_naive else None
    return SearchResult(best=plans[0], runner_ups=tuple(plans[1:]), naive=naive, cluster=cluster)


def replan(cluster: Cluster, model: ModelShape, training: TrainingConfig, excluded: Iterable[int], *,
           constraints: DegreeConstraints | None = None) -> Plan:
    """The best plan without the `excluded` cards (an eviction): the same search, no naive plan."""
    return search(cluster, model, training, excluded=excluded, top_n=1, constraints=constraints,
                  include_naive=False).best
