"""The naive plan: what a framework that assumes identical cards would run, costed by the same model on
the real cards. It is the baseline every predicted speedup is measured against.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .allocate import even_split
from .assemble import build_plan
from .cluster import Cluster
from .evaluate import Evaluation, GridContext, evaluate, grid_context, model_tables, uniform_placement
from .layout import BlockTable, naive_blocks
from .model_cost import ModelShape
from .plan import Degrees, Plan
from .space import DegreeConstraints, cp_options, divisors, ep_options, tp_options
from .training import TrainingConfig


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
            for pp in divisors(len(blocks), min(shape.num_layers, constraints.max_pp)):
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
