"""Turns an evaluated layout into the `Plan` the runtime reads: ranks in mesh order, per-card memory
and busy compute time (own speed, own experts, own micro-batches), expert placement per layer, and the
step-time terms that add up to the prediction.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import cost
from .allocate import contiguous_owners
from .cluster import Card
from .evaluate import Evaluation, GridContext, _activation_memory, _stage_sums, _static_memory
from .layout import card_flops_per_s
from .plan import CardMemory, Plan, StepTimeTerms


def build_plan(ctx: GridContext, result: Evaluation, cards: Mapping[int, Card], *, label: str) -> Plan:
    """The full Plan for an evaluated layout: ranks, per-card memory and compute, terms."""
    tables, degrees = ctx.tables, ctx.degrees
    pp, tp, ep = degrees.pp, degrees.tp, degrees.ep
    g, tokens, mult = degrees.replicas_per_expert_group, ctx.tokens_per_rank, tables.multiplier
    precision = tables.training.precision
    sums = {name: value[0] for name, value in _stage_sums(tables, np.asarray([result.layers_per_stage])).items()}
    replica_micro_batches = np.repeat(result.micro_batches_per_group, g)
    counts = np.asarray(tables.expert_counts, dtype=np.float64)

    rank_to_card, memory, compute_time = [], [], []
    for rank in range(degrees.world_size):
        s, d, c, t = degrees.coordinate(rank)
        card = cards[ctx.table.blocks[ctx.grid[s, d]].card_ids[c * tp + t]]
        experts = ctx.experts_per_position[s, :, degrees.ep_rank(d, c)]  # (K,)
        dense_params = sums["dense_params"][s] / tp
        expert_params = float((experts * sums["kind_layers"][s]).sum()) * tables.costs.params_per_expert / tp
        params, grads, optimizer = _static_memory(tables, degrees, dense_params, expert_params)
        in_flight = cost.in_flight_micro_batches(s, pp, int(replica_micro_batches[d]))
        activations = _activation_memory(tables, degrees, tokens, sums["activation"][s], in_flight, s == pp - 1)
        memory.append(CardMemory(float(params), float(grads), float(optimizer), float(activations),
                                 card.spec.memory_bytes))
        expert_time = sum(cost.expert_compute_time_s(tokens * mult / tp * sums["expert_flops"][s][k], ep,
                                                     experts[k] / counts[k], card_flops_per_s(card))
                          for k in range(len(counts)))
        weights = (dense_params + expert_params) * precision.param_bytes * mult
        busy = cost.stage_compute_time_s(tokens * mult / tp * sums["dense_flops"][s], card_flops_per_s(card),
                                         expert_time, weights, card.spec.memory_bandwidth_bytes_per_s * card.spec.speed)
        compute_time.append(float(busy * replica_micro_batches[d]))
        rank_to_card.append(card.global_id)

    placement = []
    for layer in range(tables.num_layers):
        stage = int(np.searchsorted(np.cumsum(result.layers_per_stage), layer, side="right"))
        placement.append(contiguous_owners(ctx.experts_per_position[stage, tables.kind_of_layer[layer]]))
    used = set(rank_to_card)
    return Plan(
        degrees=degrees, rank_to_card=tuple(rank_to_card), layers_per_stage=result.layers_per_stage,
        micro_batches_per_replica=tuple(int(m) for m in replica_micro_batches),
        micro_batch_size=tables.training.micro_batch_size, expert_placement=tuple(placement),
        step_time_s=result.step_time_s, terms=step_time_terms(result), memory_per_rank=tuple(memory),
        compute_time_per_rank_s=tuple(compute_time),
        unused_cards=tuple(sorted(i for i in cards if i not in used)), label=label)


def step_time_terms(result: Evaluation) -> StepTimeTerms:
    """Busy terms: per-micro-batch stage parts × the group's micro-batches, averaged over all
    (stage, group) cells; bubble averaged over groups; the rest of the step is waiting."""
    m = result.micro_batches_per_group[None, :]
    busy = {name: float((m * part).mean()) for name, part in result.stage_parts.items()}
    cell_busy = m * sum(result.stage_parts.values()) + result.bubble_s[None, :]  # (pp, G), bubble included
    return StepTimeTerms(
        compute_s=busy["compute"], tp_comm_s=busy["tp_comm"], cp_comm_s=busy["cp_comm"],
        expert_all_to_all_s=busy["expert_all_to_all"], pipeline_p2p_s=busy["pipeline_p2p"],
        pipeline_bubble_s=float(result.bubble_s.mean()), dp_grad_sync_s=result.dp_exposed_s,
        straggler_wait_s=cost.straggler_wait_time_s(result.step_time_s - result.dp_exposed_s, cell_busy))
