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

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from . import cost
from .allocate import even_split, split_layers
from .cards import GIB
from .cluster import Cluster
from .assemble import build_plan
from .evaluate import (Evaluation, GridContext, ModelTables, evaluate, evaluate_batch, grid_context, model_tables,
                       split_inputs, uniform_placement)
from .layout import BlockTable, block_selections, candidate_grids, form_blocks, naive_blocks, speed_order
from .model_cost import ModelShape
from .plan import Degrees, Plan
from .training import TrainingConfig

# Pass 2 takes degree tuples in pass-1 order and searches each fully (every dp option, both block
# selections, every stage order of short pipelines, exact layer splits) until it has costed this many
# layouts, and at least PASS_TWO_MIN_TUPLES tuples. Small clusters have few layouts per tuple, so
# there every tuple gets the full search.
PASS_TWO_LAYOUTS = 300
PASS_TWO_MIN_TUPLES = 4
# Finalists whose layer split is refined by local moves in pass 3.
REFINED_FINALISTS = 32


@dataclass(frozen=True)
class DegreeConstraints:
    """Fix some degrees (a job file's explicit `parallelism`, or a runtime that only runs data
    parallelism: `DegreeConstraints(pp=1, cp=1, tp=1, ep=1)`) and bound the pipeline depth."""

    pp: int | None = None
    dp: int | None = None
    cp: int | None = None
    tp: int | None = None
    ep: int | None = None
    max_pp: int = 16  # deeper pipelines add bubble and p2p hops; bounding it keeps the search fast

    def allows(self, name: str, value: int) -> bool:
        fixed = getattr(self, name)
        return fixed is None or fixed == value


DATA_PARALLEL_ONLY = DegreeConstraints(pp=1, cp=1, tp=1, ep=1)


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
    result: Evaluation

    @property
    def key(self) -> tuple[float, int]:
        return (self.step_time_s, self.order)


# --- enumeration --------------------------------------------------------------------------------------

def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def tp_options(shape: ModelShape, cards_per_node: int, constraints: DegreeConstraints) -> list[int]:
    """TP splits heads and FFN columns evenly and stays inside a node."""
    return [d for d in _divisors(shape.num_heads, cards_per_node)
            if shape.expert_ffn_size % d == 0 and shape.shared_ffn_size % d == 0 and constraints.allows("tp", d)]


def cp_options(shape: ModelShape, cards_per_node: int, constraints: DegreeConstraints) -> list[int]:
    return [d for d in _divisors(shape.seq_len, cards_per_node) if constraints.allows("cp", d)]


def ep_options(shape: ModelShape, cp: int, constraints: DegreeConstraints) -> list[int]:
    """EP divides every layer's expert count (each ep rank holds at least one expert per layer) and
    nests with CP (an expert group is inside one CP ring or spans whole rings)."""
    counts = [shape.experts_in_layer(i) for i in range(shape.num_layers)]
    common = math.gcd(*counts)
    return [d for d in _divisors(common, min(counts)) if (d % cp == 0 or cp % d == 0) and constraints.allows("ep", d)]


def dp_options(table: BlockTable, pp: int, g: int, micro_batches: int, constraints: DegreeConstraints) -> list[int]:
    """All blocks, or only the fastest tiers (a slow tier can cost more in memory or sync than it adds).
    dp is a multiple of the lockstep group g, and every replica needs at least one micro-batch."""
    if micro_batches % g:
        return []
    order = speed_order(table, range(len(table.blocks)))
    flops = table.flops_per_s[order]
    tiers = [i for i in range(1, len(order)) if flops[i] != flops[i - 1]] + [len(order)]
    options = set()
    for blocks in tiers:
        dp = min(blocks // pp, micro_batches)
        dp -= dp % g
        if dp >= 1 and constraints.allows("dp", dp):
            options.add(dp)
    return sorted(options, reverse=True)


def memory_lower_bound_bytes(tables: ModelTables, degrees: Degrees) -> float:
    """No split can put less than this on its fullest card: the average stage's weights, gradients and
    optimizer shard, plus one micro-batch of activations and the logits (perfect balance assumed)."""
    costs, p = tables.costs, tables.training.precision
    shards = degrees.dp * degrees.cp
    dense = (float(costs.dense_params.sum()) + costs.embedding_params + costs.head_params) / degrees.tp
    experts = float(costs.num_experts.sum()) / degrees.ep * costs.params_per_expert / degrees.tp
    static = (dense * (p.param_bytes + p.grad_bytes + p.optimizer_bytes_per_param / shards)
              + experts * (p.param_bytes + p.grad_bytes + p.optimizer_bytes_per_param * degrees.ep / shards))
    tokens = tables.training.micro_batch_size * tables.shape.seq_len / degrees.cp
    activations = cost.activation_memory_bytes(tokens, float(costs.activation_bytes_per_token.sum()), 1, degrees.tp)
    logits = cost.logits_memory_bytes(tokens, tables.shape.vocab_size, degrees.tp)
    return (static + activations + logits) / degrees.pp


def _speed_candidates(ctx: GridContext) -> list[np.ndarray]:
    """Stage speeds to split layers by: the slowest group (every replica keeps pace), the mean, and
    the harmonic mean (what a replica of mixed cells sustains). One when every stage is uniform."""
    flops = ctx.slowest_flops
    slowest = flops.min(axis=1)
    if np.array_equal(slowest, flops.max(axis=1)):
        return [slowest]
    return [slowest, flops.mean(axis=1), flops.shape[1] / (1.0 / flops).sum(axis=1)]


def _best_split(ctx: GridContext) -> Evaluation | None:
    """Exact proportional splits (within memory) for each candidate stage speed; the best of them."""
    inputs = split_inputs(ctx)
    splits = {split for speeds in _speed_candidates(ctx)
              if (split := split_layers(stage_speed=speeds, **inputs)) is not None}
    return _best_of(ctx, sorted(splits))


def _best_of(ctx: GridContext, splits: list[tuple[int, ...]]) -> Evaluation | None:
    """The fastest feasible split among `splits` (first one on ties), fully evaluated."""
    if not splits:
        return None
    times, feasible = evaluate_batch(ctx, splits)
    times = np.where(feasible, times, np.inf)
    best = int(np.argmin(times))
    return evaluate(ctx, splits[best]) if np.isfinite(times[best]) else None


def _refine(ctx: GridContext, result: Evaluation, max_sweeps: int = 64) -> Evaluation:
    """Move one layer across one stage boundary while that helps (communication and the embedding /
    head ends are not in the proportional split's cost, so the optimum can sit a layer away)."""
    for _ in range(max_sweeps):
        layers = list(result.layers_per_stage)
        moves = []
        for boundary in range(len(layers) - 1):
            for step in (1, -1):
                moved = layers.copy()
                moved[boundary] += step
                moved[boundary + 1] -= step
                if min(moved) >= 1:
                    moves.append(tuple(moved))
        trial = _best_of(ctx, moves)
        if trial is None or not trial.step_time_s < result.step_time_s * (1 - 1e-12):
            return result
        result = trial
    return result


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
    first_pass: list[tuple[float, int, tuple]] = []
    counter = 0
    for tp, cp, table, pp, ep in _tuples(cluster, tables, constraints):
        g = max(1, ep // cp)
        usable = cost.usable_memory_bytes(float(table.memory_bytes.max()))
        options = []
        for dp in dp_options(table, pp, g, tables.micro_batches, constraints):
            degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp, ep=ep)
            need = memory_lower_bound_bytes(tables, degrees)
            shortfall.note(need, degrees)
            if need <= usable:
                options.append(degrees)
        # Pass 1 scores a tuple by its first dp option that fits (all blocks, else fewer tiers).
        score = math.inf
        for degrees in options:
            chosen = block_selections(table, pp * degrees.dp)[0]
            for grid in candidate_grids(table, chosen, pp, degrees.dp, thorough=False):
                result = _best_split(grid_context(tables, degrees, table, grid))
                if result is not None:
                    score = min(score, result.step_time_s)
            if score < math.inf:
                break
        if options:
            counter += 1
            first_pass.append((score, counter, (options, table)))
    if not first_pass:
        raise _no_fit_error(tables, shortfall, largest)
    first_pass.sort(key=lambda item: item[:2])
    candidates: list[_Candidate] = []
    layouts = 0
    for rank, (_, _, (options, table)) in enumerate(first_pass):
        if (layouts >= PASS_TWO_LAYOUTS and rank >= PASS_TWO_MIN_TUPLES) and candidates:
            break
        for degrees in options:
            for chosen in block_selections(table, degrees.pp * degrees.dp):
                for grid in candidate_grids(table, chosen, degrees.pp, degrees.dp):
                    ctx = grid_context(tables, degrees, table, grid)
                    result = _best_split(ctx)
                    counter += 1
                    layouts += 1
                    if result is not None:
                        candidates.append(_Candidate(result.step_time_s, counter, ctx, result))
    if not candidates:
        raise _no_fit_error(tables, shortfall, largest)
    candidates.sort(key=lambda c: c.key)
    refined = [_Candidate(r.step_time_s, c.order, c.ctx, r)
               for c in candidates[:REFINED_FINALISTS] for r in [_refine(c.ctx, c.result)]]
    return sorted(refined + candidates[REFINED_FINALISTS:], key=lambda c: c.key)


def _no_fit_error(tables: ModelTables, shortfall: _Shortfall, largest_bytes: int) -> ValueError:
    if shortfall.degrees is None:
        return ValueError(
            f"no layout is possible: {tables.micro_batches} micro-batches per step cannot give every "
            "data-parallel replica one; raise the global batch or lower micro_batch_size")
    usable = cost.usable_memory_bytes(largest_bytes)
    hints = "a smaller micro_batch_size" if tables.training.recompute else "recompute=True, a smaller micro_batch_size"
    return ValueError(
        f"no layout fits in memory: the smallest layout ({shortfall.degrees.describe()}) needs "
        f"{shortfall.need_bytes / GIB:.1f} GiB per card, the largest card has {largest_bytes / GIB:.1f} GiB "
        f"({usable / GIB:.1f} GiB usable); try {hints}, or more cards")


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
        plans.append(build_plan(candidate.ctx, candidate.result, cards, label="searched"))
        if len(plans) == top_n:
            break
    naive = naive_plan(cluster, model, training, constraints=constraints) if include_naive else None
    return SearchResult(best=plans[0], runner_ups=tuple(plans[1:]), naive=naive, cluster=cluster)


def replan(cluster: Cluster, model: ModelShape, training: TrainingConfig, excluded: Iterable[int], *,
           constraints: DegreeConstraints | None = None) -> Plan:
    """The best plan without the `excluded` cards (an eviction): the same search, no naive plan."""
    return search(cluster, model, training, excluded=excluded, top_n=1, constraints=constraints,
                  include_naive=False).best


def naive_plan(cluster: Cluster, model: ModelShape, training: TrainingConfig, *,
               excluded: Iterable[int] = frozenset(),
               constraints: DegreeConstraints | None = None) -> Plan | None:
    """What a framework that assumes identical cards does: every card used, ranks in card-id order,
    layers, micro-batches and experts split evenly. Among such layouts it takes the one the cost model
    rates best on the real cards (a well-tuned homogeneous run), so the reported speedup is not
    inflated by a poor choice of degrees. None when no uniform layout fits."""
    constraints = constraints or DegreeConstraints()
    cluster = cluster.without(excluded)
    tables = model_tables(model, training)
    shape, micro_batches = model, tables.micro_batches
    per_node = max(len(cards) for cards in cluster.cards_by_node().values())
    best: tuple[float, GridContext, Evaluation] | None = None
    for tp in tp_options(shape, per_node, constraints):
        for cp in cp_options(shape, per_node // tp, constraints):
            blocks = naive_blocks(cluster, cp * tp)
            if blocks is None:
                continue
            table = BlockTable.of(blocks)
            for pp in _divisors(len(blocks), min(shape.num_layers, constraints.max_pp)):
                dp = len(blocks) // pp
                for ep in ep_options(shape, cp, constraints):
                    g = max(1, ep // cp)
                    if not constraints.allows("pp", pp) or not constraints.allows("dp", dp) \
                            or (dp * cp) % ep or dp % g or micro_batches % g or micro_batches < dp:
                        continue
                    degrees = Degrees(pp=pp, dp=dp, cp=cp, tp=tp, ep=ep)
                    grid = np.arange(len(blocks)).reshape(pp, dp)
                    ctx = grid_context(tables, degrees, table, grid, uniform_placement(tables, pp, ep))
                    result = evaluate(ctx, even_split(shape.num_layers, pp),
                                      np.array(even_split(micro_batches // g, dp // g)))
                    if result.feasible and (best is None or result.step_time_s < best[0]):
                        best = (result.step_time_s, ctx, result)
    if best is None:
        return None
    return build_plan(best[1], best[2], {card.global_id: card for card in cluster.cards}, label="naive")
