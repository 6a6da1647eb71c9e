"""The search space: which degrees are allowed for a model on a cluster, which data-parallel widths
are worth trying, and a memory floor that prunes degrees no layout of which can fit. Shared by the
search, the naive plan and the oracle so they all range over the same layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import cost
from .evaluate import ModelTables
from .layout import BlockTable
from .model_cost import ModelShape
from .plan import Degrees


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

    @classmethod
    def fixed(cls, **degrees: int | None) -> "DegreeConstraints":
        """From explicit degrees where 0 or None means "let the planner choose" (the job file's
        `parallelism` section): `DegreeConstraints.fixed(dp=0, tp=2, pp=0, cp=0, ep=0)`."""
        unknown = sorted(set(degrees) - {"pp", "dp", "cp", "tp", "ep"})
        if unknown:
            raise ValueError(f"unknown degree(s) {unknown}; degrees are pp, dp, cp, tp, ep")
        return cls(**{name: (value or None) for name, value in degrees.items()})

    def allows(self, name: str, value: int) -> bool:
        fixed = getattr(self, name)
        return fixed is None or fixed == value


DATA_PARALLEL_ONLY = DegreeConstraints(pp=1, cp=1, tp=1, ep=1)


def divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def tp_options(shape: ModelShape, cards_per_node: int, constraints: DegreeConstraints) -> list[int]:
    """TP splits heads and FFN columns evenly and stays inside a node."""
    return [d for d in divisors(shape.num_heads, cards_per_node)
            if shape.expert_ffn_size % d == 0 and shape.shared_ffn_size % d == 0 and constraints.allows("tp", d)]


def cp_options(shape: ModelShape, cards_per_node: int, constraints: DegreeConstraints) -> list[int]:
    return [d for d in divisors(shape.seq_len, cards_per_node) if constraints.allows("cp", d)]


def ep_options(shape: ModelShape, cp: int, constraints: DegreeConstraints) -> list[int]:
    """EP divides every layer's expert count (each ep rank holds at least one expert per layer) and
    nests with CP (an expert group is inside one CP ring or spans whole rings)."""
    counts = [shape.experts_in_layer(i) for i in range(shape.num_layers)]
    common = math.gcd(*counts)
    return [d for d in divisors(common, min(counts)) if (d % cp == 0 or cp % d == 0) and constraints.allows("ep", d)]


# A slower tier starts where block speed drops by more than this; at most MAX_TIER_EDGES tiers are cut.
TIER_DROP = 0.1
MAX_TIER_EDGES = 4


def dp_options(table: BlockTable, pp: int, g: int, micro_batches: int, constraints: DegreeConstraints, *,
               every_width: bool = False) -> list[int]:
    """All blocks, or only the fastest tiers (a slow tier can cost more in memory or sync than it adds);
    with `every_width` (small clusters), every width. dp is a multiple of the lockstep group g, and
    every replica needs at least one micro-batch."""
    if micro_batches % g:
        return []
    flops = table.flops_per_s[table.by_speed]
    # Tier edges: where speed drops by more than TIER_DROP; only the steepest few, so a cluster of
    # calibrated cards (every speed slightly different) does not multiply the search.
    drops = flops[1:] / flops[:-1]
    edges = np.flatnonzero(drops < 1 - TIER_DROP) + 1
    edges = np.sort(edges[np.argsort(drops[edges - 1], kind="stable")[:MAX_TIER_EDGES]])
    tiers = edges.tolist() + [len(flops)]
    options = set()
    if every_width:
        tiers = list(range(pp, len(flops) + 1))
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
