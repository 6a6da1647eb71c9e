"""Costing one layout: a grid of blocks plus a layer split gives a predicted step time, memory per
card, and (for the plans that are kept) a full `Plan`. Search, naive plan and oracle all go through
`evaluate`, so they are compared with the same cost model.

Expert parallelism borrows ranks from dp × cp (flattened dp-major): an expert group covers
max(1, ep / cp) whole replicas, which then run their micro-batches in lockstep (the all-to-all in every
MoE layer is a barrier). The unit that gets micro-batches is therefore such a replica group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import cost
from .allocate import allocate_units, contiguous_owners, even_split, place_experts
from .cluster import Card
from .layout import BlockTable, card_flops_per_s
from .model_cost import LayerCosts, ModelShape, kv_bytes_per_token, layer_costs, training_flops_multiplier
from .plan import CardMemory, Degrees, Plan, StepTimeTerms
from .training import TrainingConfig


@dataclass(frozen=True)
class ModelTables:
    """Per-layer costs as prefix sums, so any stage's totals are two lookups."""

    shape: ModelShape
    training: TrainingConfig
    costs: LayerCosts
    micro_batches: int  # per optimizer step, over all replicas
    expert_counts: tuple[int, ...]  # distinct num_experts values ("kinds") over layers
    kind_of_layer: np.ndarray
    dense_flops: np.ndarray  # (L+1,) prefix sums
    score_flops: np.ndarray
    expert_flops: np.ndarray  # (K, L+1)
    kind_layers: np.ndarray  # (K, L+1)
    dense_params: np.ndarray
    top_k: np.ndarray
    activation: np.ndarray
    multiplier: int

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers


def model_tables(shape: ModelShape, training: TrainingConfig) -> ModelTables:
    costs = layer_costs(shape, recompute=training.recompute, precision=training.precision)
    counts = tuple(sorted({int(e) for e in costs.num_experts}))
    kind = np.array([counts.index(int(e)) for e in costs.num_experts], dtype=np.int64)
    one_hot = (kind[None, :] == np.arange(len(counts))[:, None]).astype(np.float64)

    def prefix(values: np.ndarray) -> np.ndarray:
        pad = np.zeros(values.shape[:-1] + (1,))
        return np.concatenate([pad, np.cumsum(values, axis=-1)], axis=-1)

    return ModelTables(
        shape=shape, training=training, costs=costs,
        micro_batches=training.micro_batches_per_step(shape.seq_len),
        expert_counts=counts, kind_of_layer=kind,
        dense_flops=prefix(costs.dense_flops_per_token), score_flops=prefix(costs.score_flops_per_token),
        expert_flops=prefix(one_hot * costs.expert_flops_per_token), kind_layers=prefix(one_hot),
        dense_params=prefix(costs.dense_params), top_k=prefix(costs.top_k),
        activation=prefix(costs.activation_bytes_per_token),
        multiplier=training_flops_multiplier(training.recompute))


@dataclass(frozen=True)
class GridContext:
    """Everything about a (degrees, grid) that does not depend on the layer split."""

    tables: ModelTables
    degrees: Degrees
    table: BlockTable
    grid: np.ndarray  # (pp, dp) block indices
    experts_per_position: np.ndarray  # (pp, K, ep) experts each ep position holds, per layer kind
    tokens_per_rank: float  # tokens one rank processes per micro-batch
    slowest_flops: np.ndarray  # (pp, G) slowest block of each replica group, per stage
    expert_factor: np.ndarray  # (pp, G, K) max over ep positions of experts/(E * speed)
    memory_bandwidth: np.ndarray  # (pp, G)
    intra_bandwidth: np.ndarray  # (pp, G)
    all_to_all_bandwidth: np.ndarray  # (pp, G)
    p2p_forward_bandwidth: np.ndarray  # (pp, dp); inf on the last stage
    p2p_backward_bandwidth: np.ndarray  # (pp, dp); inf on the first stage
    dp_bandwidth: np.ndarray  # (pp,) ring over a stage's replicas
    row_capacity: np.ndarray  # (pp,) usable bytes of the smallest card in each stage

    @property
    def groups(self) -> int:
        return self.grid.shape[1] // self.degrees.replicas_per_expert_group


def grid_context(tables: ModelTables, degrees: Degrees, table: BlockTable, grid: np.ndarray,
                 experts_per_position: np.ndarray | None = None) -> GridContext:
    pp, dp = grid.shape
    g = degrees.replicas_per_expert_group
    groups, ep = dp // g, degrees.ep
    flops = table.flops_per_s[grid]
    # Speed of each ep position: a group spans g replicas, each contributing its block's cp ranks.
    position_flops = np.repeat(flops.reshape(pp, groups, g), ep // g, axis=2)  # (pp, G, ep)
    if experts_per_position is None:
        worst = position_flops.min(axis=1)  # one placement per stage serves every group
        experts_per_position = np.array([[place_experts(e, worst[s]) if ep > 1 else [e]
                                          for e in tables.expert_counts] for s in range(pp)])
    counts = np.asarray(tables.expert_counts, dtype=np.float64)
    factor = (experts_per_position[:, None, :, :] / counts[None, None, :, None]
              / position_flops[:, :, None, :]).max(axis=3)
    nodes = table.node_index[grid]
    group_min = lambda values: values.reshape(pp, groups, g).min(axis=2)  # noqa: E731
    same_node_group = (nodes.reshape(pp, groups, g) == nodes.reshape(pp, groups, g)[:, :, :1]).all(axis=2)
    intra, inter = table.intra_bandwidth[grid], table.inter_bandwidth[grid]
    # An expert group inside one node talks over NVLink-class links, otherwise over the NICs.
    all_to_all = np.where(same_node_group, group_min(intra), group_min(inter))
    link = np.where(nodes[1:] == nodes[:-1], np.minimum(intra[1:], intra[:-1]),
                    np.minimum(inter[1:], inter[:-1]))  # (pp-1, dp)
    infinite = np.full((1, dp), np.inf)
    row_same_node = (nodes == nodes[:, :1]).all(axis=1)
    return GridContext(
        tables=tables, degrees=degrees, table=table, grid=grid, experts_per_position=experts_per_position,
        tokens_per_rank=tables.training.micro_batch_size * tables.shape.seq_len / degrees.cp,
        slowest_flops=group_min(flops), expert_factor=factor,
        memory_bandwidth=group_min(table.memory_bandwidth[grid]), intra_bandwidth=group_min(intra),
        all_to_all_bandwidth=all_to_all,
        p2p_forward_bandwidth=np.concatenate([link, infinite]),
        p2p_backward_bandwidth=np.concatenate([infinite, link]),
        dp_bandwidth=np.where(row_same_node, intra.min(axis=1), inter.min(axis=1)),
        row_capacity=cost.usable_memory_bytes(table.memory_bytes[grid].min(axis=1)))


@dataclass(frozen=True)
class Evaluation:
    step_time_s: float
    feasible: bool
    layers_per_stage: tuple[int, ...]
    micro_batches_per_group: np.ndarray  # (G,)
    stage_parts: dict  # name → (pp, G) seconds per micro-batch
    bubble_s: np.ndarray  # (G,)
    dp_exposed_s: float
    row_memory_bytes: np.ndarray  # (pp,) worst card of each stage (all micro-batches in flight)


def _stage_sums(tables: ModelTables, layers_per_stage) -> dict:
    bounds = np.concatenate([[0], np.cumsum(layers_per_stage)]).astype(np.int64)
    low, high = bounds[:-1], bounds[1:]
    span = lambda prefix: prefix[..., high] - prefix[..., low]  # noqa: E731
    costs = tables.costs
    dense_flops, dense_params = span(tables.dense_flops), span(tables.dense_params)
    dense_flops[-1] += costs.head_flops_per_token
    dense_params[0] += costs.embedding_params
    dense_params[-1] += costs.head_params
    return dict(layers=(high - low).astype(np.float64), dense_flops=dense_flops, score_flops=span(tables.score_flops),
                expert_flops=span(tables.expert_flops), kind_layers=span(tables.kind_layers),
                dense_params=dense_params, top_k=span(tables.top_k), activation=span(tables.activation))


def evaluate(ctx: GridContext, layers_per_stage, micro_batches_per_group=None) -> Evaluation:
    """Predicted step time of the layout with this layer split. Micro-batches go to replica groups by
    `allocate_units` (optimal for the 1F1B finish times) unless given."""
    tables, degrees, shape = ctx.tables, ctx.degrees, ctx.tables.shape
    precision, recompute = tables.training.precision, tables.training.recompute
    pp, tp, cp, ep = degrees.pp, degrees.tp, degrees.cp, degrees.ep
    g, tokens, mult = degrees.replicas_per_expert_group, ctx.tokens_per_rank, tables.multiplier
    hidden, act_bytes = shape.hidden_size, precision.activation_bytes
    sums = _stage_sums(tables, layers_per_stage)

    dense_time = (tokens * mult * sums["dense_flops"] / tp)[:, None] / ctx.slowest_flops
    expert_time = tokens * mult * ep / tp * (ctx.expert_factor * sums["expert_flops"].T[:, None, :]).sum(axis=2)
    dense_params = sums["dense_params"] / tp
    expert_params = (ctx.experts_per_position.max(axis=2) * sums["kind_layers"].T).sum(axis=1) \
        * tables.costs.params_per_expert / tp
    # Roofline: every pass (forward, backward, recompute) streams the stage's weights once.
    weight_time = ((dense_params + expert_params) * precision.param_bytes * mult)[:, None] / ctx.memory_bandwidth
    parts = {"compute": np.maximum(dense_time + expert_time, weight_time)}
    layers = sums["layers"][:, None]
    zero = np.zeros_like(dense_time)
    parts["tp_comm"] = (cost.tp_collective_time_s(tokens, hidden, act_bytes, tp, ctx.intra_bandwidth, layers,
                                                  recompute) if tp > 1 else zero)
    if cp > 1:
        ring = cost.cp_ring_exchange_time_s(tokens, kv_bytes_per_token(shape, act_bytes), cp, ctx.intra_bandwidth,
                                            layers, recompute)
        scores = (tokens * mult * sums["score_flops"] / tp)[:, None] / ctx.slowest_flops
        parts["cp_comm"] = cost.exposed_time_s(ring, scores)
    else:
        parts["cp_comm"] = zero
    parts["expert_all_to_all"] = (cost.expert_all_to_all_time_s(
        tokens / tp, sums["top_k"][:, None], hidden, act_bytes, ep, ctx.all_to_all_bandwidth, recompute)
        if ep > 1 else zero)
    if pp > 1:
        p2p = (cost.pipeline_p2p_time_s(tokens, hidden, act_bytes, tp, ctx.p2p_forward_bandwidth, 1)
               + cost.pipeline_p2p_time_s(tokens, hidden, act_bytes, tp, ctx.p2p_backward_bandwidth, 1))
        parts["pipeline_p2p"] = p2p.reshape(pp, -1, g).max(axis=2)
    else:
        parts["pipeline_p2p"] = zero
    stage_time = sum(parts.values())
    slowest_stage = stage_time.max(axis=0)
    bubble = cost.pipeline_bubble_time_s(stage_time, axis=0)
    if micro_batches_per_group is None:
        micro_batches_per_group = allocate_units(tables.micro_batches // g, slowest_stage, bubble, minimum=1)
    finish = micro_batches_per_group * slowest_stage + bubble
    critical = int(np.argmax(finish))

    shards = degrees.dp * cp
    dp_exposed = 0.0
    if shards > 1:
        reduce_scatter, all_gather = cost.dp_grad_sync_time_s(
            dense_params * precision.grad_bytes, dense_params * precision.param_bytes, shards, ctx.dp_bandwidth)
        expert_rs, expert_ag = cost.dp_grad_sync_time_s(
            expert_params * precision.grad_bytes, expert_params * precision.param_bytes, shards // ep,
            ctx.dp_bandwidth)
        compute = parts["compute"][:, critical]
        exposed = cost.dp_exposed_time_s(reduce_scatter + expert_rs, all_gather + expert_ag,
                                         compute * (mult - 1) / mult, compute / mult)
        dp_exposed = float(exposed.max())

    row_memory = _row_memory_bytes(ctx, sums, dense_params, expert_params)
    return Evaluation(
        step_time_s=float(finish[critical]) + dp_exposed,
        feasible=bool((row_memory <= ctx.row_capacity).all()),
        layers_per_stage=tuple(int(x) for x in layers_per_stage),
        micro_batches_per_group=micro_batches_per_group, stage_parts=parts, bubble_s=bubble,
        dp_exposed_s=dp_exposed, row_memory_bytes=row_memory)


def _static_memory(tables: ModelTables, degrees: Degrees, dense_params, expert_params):
    """(params, grads, optimizer) bytes: weights and grads whole on each card, optimizer state sharded
    over dp × cp for dense weights and over the replicas of the same experts for expert weights."""
    p = tables.training.precision
    shards = degrees.dp * degrees.cp
    both = dense_params + expert_params
    return (cost.param_memory_bytes(both, p.param_bytes), cost.grad_memory_bytes(both, p.grad_bytes),
            cost.optimizer_memory_bytes(dense_params, p.optimizer_bytes_per_param, shards)
            + cost.optimizer_memory_bytes(expert_params, p.optimizer_bytes_per_param, shards // degrees.ep))


def _activation_memory(tables: ModelTables, degrees: Degrees, tokens, activation, in_flight, last_stage):
    recompute_working_set = (tokens * float(tables.costs.full_activation_bytes_per_token.max()) / degrees.tp
                             if tables.training.recompute else 0.0)
    logits = np.where(last_stage, cost.logits_memory_bytes(tokens, tables.shape.vocab_size, degrees.tp), 0.0)
    return cost.activation_memory_bytes(tokens, activation, in_flight, degrees.tp, recompute_working_set) + logits


def _row_memory_bytes(ctx: GridContext, sums, dense_params, expert_params) -> np.ndarray:
    """Worst card of each stage, with all pp - s micro-batches of a 1F1B stage in flight."""
    pp = ctx.degrees.pp
    stages = np.arange(pp)
    params, grads, optimizer = _static_memory(ctx.tables, ctx.degrees, dense_params, expert_params)
    activations = _activation_memory(ctx.tables, ctx.degrees, ctx.tokens_per_rank, sums["activation"],
                                     pp - stages, stages == pp - 1)
    return params + grads + optimizer + activations


def split_inputs(ctx: GridContext) -> dict:
    """Per-layer cost and per-stage memory the layer-split routine needs (see allocate.split_layers)."""
    tables, degrees = ctx.tables, ctx.degrees
    pp, costs = degrees.pp, tables.costs
    stages = np.arange(pp)
    max_experts = ctx.experts_per_position.max(axis=2)[:, tables.kind_of_layer]  # (pp, L)
    dense = np.broadcast_to(costs.dense_params / degrees.tp, max_experts.shape)
    expert = max_experts * costs.params_per_expert / degrees.tp
    layer_memory = sum(_static_memory(tables, degrees, dense, expert)) + cost.activation_memory_bytes(
        ctx.tokens_per_rank, costs.activation_bytes_per_token[None, :], (pp - stages)[:, None], degrees.tp)
    ends = np.zeros(pp)
    ends[0] += costs.embedding_params / degrees.tp
    ends[-1] += costs.head_params / degrees.tp
    fixed = sum(_static_memory(tables, degrees, ends, 0.0)) + _activation_memory(
        tables, degrees, ctx.tokens_per_rank, 0.0, 0.0, stages == pp - 1)
    extra = np.zeros(pp)
    extra[-1] = costs.head_flops_per_token
    return dict(layer_cost=costs.dense_flops_per_token + costs.expert_flops_per_token, stage_extra_cost=extra,
                layer_memory_bytes=layer_memory, stage_fixed_memory_bytes=fixed,
                stage_capacity_bytes=ctx.row_capacity)


def build_plan(ctx: GridContext, result: Evaluation, cards: Mapping[int, Card], *, label: str) -> Plan:
    """The full Plan for an evaluated layout: ranks, per-card memory and compute, terms."""
    tables, degrees = ctx.tables, ctx.degrees
    pp, dp, cp, tp, ep = degrees.pp, degrees.dp, degrees.cp, degrees.tp, degrees.ep
    g, tokens, mult = degrees.replicas_per_expert_group, ctx.tokens_per_rank, tables.multiplier
    precision = tables.training.precision
    sums = _stage_sums(tables, result.layers_per_stage)
    replica_micro_batches = np.repeat(result.micro_batches_per_group, g)
    counts = np.asarray(tables.expert_counts, dtype=np.float64)

    rank_to_card, memory, compute_time = [], [], []
    for rank in range(degrees.world_size):
        s, d, c, t = degrees.coordinate(rank)
        card = cards[ctx.table.blocks[ctx.grid[s, d]].card_ids[c * tp + t]]
        experts = ctx.experts_per_position[s, :, degrees.ep_rank(d, c)]  # (K,)
        dense_params = sums["dense_params"][s] / tp
        expert_params = float((experts * sums["kind_layers"][:, s]).sum()) * tables.costs.params_per_expert / tp
        params, grads, optimizer = _static_memory(tables, degrees, dense_params, expert_params)
        activations = _activation_memory(tables, degrees, tokens, sums["activation"][s],
                                         min(pp - s, int(replica_micro_batches[d])), s == pp - 1)
        memory.append(CardMemory(float(params), float(grads), float(optimizer), float(activations),
                                 card.spec.memory_bytes))
        flops = card_flops_per_s(card)
        busy = tokens * mult / tp * (sums["dense_flops"][s] + ep * float(
            (sums["expert_flops"][:, s] * experts / counts).sum())) / flops
        weights = (dense_params + expert_params) * precision.param_bytes * mult / (
            card.spec.memory_bandwidth_bytes_per_s * card.spec.speed)
        compute_time.append(float(max(busy, weights) * replica_micro_batches[d]))
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
    bubble = float(result.bubble_s.mean())
    accounted = sum(busy.values()) + bubble + result.dp_exposed_s
    return StepTimeTerms(
        compute_s=busy["compute"], tp_comm_s=busy["tp_comm"], cp_comm_s=busy["cp_comm"],
        expert_all_to_all_s=busy["expert_all_to_all"], pipeline_p2p_s=busy["pipeline_p2p"],
        pipeline_bubble_s=bubble, dp_grad_sync_s=result.dp_exposed_s,
        straggler_wait_s=max(result.step_time_s - accounted, 0.0))


def uniform_placement(tables: ModelTables, pp: int, ep: int) -> np.ndarray:
    """Experts split as evenly as possible, in order: what a framework unaware of speed does."""
    return np.array([[even_split(e, ep) for e in tables.expert_counts] for _ in range(pp)])
