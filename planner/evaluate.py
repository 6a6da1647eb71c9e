"""Costing one layout: a grid of blocks plus a layer split gives a predicted step time and the memory
of each stage's fullest card. Search, naive plan and oracle all go through here, so they are compared
with the same cost model (assemble.py turns the layouts that are kept into Plans).

Expert parallelism borrows ranks from dp × cp (flattened dp-major): an expert group covers
max(1, ep / cp) whole replicas, which then run their micro-batches in lockstep (the all-to-all in every
MoE layer is a barrier). The unit that gets micro-batches is therefore such a replica group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import cost
from .allocate import allocate_units, even_split, place_experts
from .layout import BlockTable
from .model_cost import LayerCosts, ModelShape, kv_bytes_per_token, layer_costs, training_flops_multiplier
from .plan import Degrees
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
    multiplier: int  # training FLOPs per forward FLOP
    # Prefix sums over layers (index l = total of layers 0..l-1), stacked so one gather serves a batch:
    per_layer_prefix: np.ndarray  # (5, L+1): dense FLOPs, score FLOPs, dense params, top_k, activation bytes
    per_kind_prefix: np.ndarray  # (2, K, L+1): routed-expert FLOPs, layer count, per expert kind

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

    per_layer = (costs.dense_flops_per_token, costs.score_flops_per_token, costs.dense_params, costs.top_k,
                 costs.activation_bytes_per_token)
    return ModelTables(
        shape=shape, training=training, costs=costs,
        micro_batches=training.micro_batches_per_step(shape.seq_len), expert_counts=counts, kind_of_layer=kind,
        multiplier=training_flops_multiplier(training.recompute),
        per_layer_prefix=np.stack([prefix(values) for values in per_layer]),
        per_kind_prefix=np.stack([prefix(one_hot * costs.expert_flops_per_token), prefix(one_hot)]))


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
    p2p_time: np.ndarray  # (pp, G) activation + gradient sends per micro-batch
    latency: np.ndarray  # (pp, G) fixed cost of one collective: the slowest member of the replica group
    dp_bandwidth: np.ndarray  # (pp,) ring over a stage's replicas
    row_capacity: np.ndarray  # (pp,) usable bytes of the smallest card in each stage


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
    tokens = tables.training.micro_batch_size * tables.shape.seq_len / degrees.cp
    sizes = (tokens, tables.shape.hidden_size, tables.training.precision.activation_bytes, degrees.tp)
    latency = table.collective_latency[grid]  # (pp, dp)
    neighbours = np.zeros((pp, 1))
    neighbours[:-1] += 1
    neighbours[1:] += 1
    # Each stage sends one message to each neighbour per micro-batch (activations or their gradients).
    p2p = (cost.pipeline_p2p_time_s(*sizes, np.concatenate([link, infinite]), 1)
           + cost.pipeline_p2p_time_s(*sizes, np.concatenate([infinite, link]), 1)
           + cost.collectives_latency_time_s(neighbours, latency))
    row_same_node = (nodes == nodes[:, :1]).all(axis=1)
    return GridContext(
        tables=tables, degrees=degrees, table=table, grid=grid, experts_per_position=experts_per_position,
        tokens_per_rank=tokens,
        slowest_flops=group_min(flops), expert_factor=factor,
        memory_bandwidth=group_min(table.memory_bandwidth[grid]), intra_bandwidth=group_min(intra),
        all_to_all_bandwidth=all_to_all,
        p2p_time=p2p.reshape(pp, groups, g).max(axis=2),
        latency=latency.reshape(pp, groups, g).max(axis=2),
        dp_bandwidth=np.where(row_same_node, intra.min(axis=1), inter.min(axis=1)),
        row_capacity=cost.usable_memory_bytes(table.memory_bytes[grid].min(axis=1)))


# Above this many candidate finish times, evaluate_batch allocates split by split instead of listing.
LISTED_FINISH_TIMES = 1 << 14


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


def _stage_sums(tables: ModelTables, splits: np.ndarray) -> dict:
    """Totals per stage for a batch of splits (S, pp); expert-kind tables come out as (S, pp, K)."""
    ends = np.cumsum(splits, axis=1)
    high, low = ends, ends - splits
    per_layer = tables.per_layer_prefix[:, high] - tables.per_layer_prefix[:, low]  # (5, S, pp)
    by_kind = np.moveaxis(tables.per_kind_prefix[:, :, high] - tables.per_kind_prefix[:, :, low], 1, -1)
    dense_flops, score_flops, dense_params, top_k, activation = per_layer
    costs = tables.costs
    dense_flops[:, -1] += costs.head_flops_per_token
    dense_params[:, 0] += costs.embedding_params
    dense_params[:, -1] += costs.head_params
    return dict(layers=splits.astype(np.float64), dense_flops=dense_flops, score_flops=score_flops,
                expert_flops=by_kind[0], kind_layers=by_kind[1], dense_params=dense_params, top_k=top_k,
                activation=activation)


def _stage_costs(ctx: GridContext, splits: np.ndarray) -> dict:
    """Per-micro-batch stage times (S, pp, G) by part, memory of each stage's worst card (S, pp) and
    the exposed data-parallel sync (S,), for a batch of layer splits."""
    tables, degrees, shape = ctx.tables, ctx.degrees, ctx.tables.shape
    precision, recompute = tables.training.precision, tables.training.recompute
    tp, cp, ep = degrees.tp, degrees.cp, degrees.ep
    tokens, mult = ctx.tokens_per_rank, tables.multiplier
    hidden, act_bytes = shape.hidden_size, precision.activation_bytes
    sums = _stage_sums(tables, splits)

    dense_flops = (tokens * mult * sums["dense_flops"] / tp)[..., None]
    # expert_factor already holds max over ep ranks of share / speed, so flops_per_s is 1 here
    expert_time = cost.expert_compute_time_s(
        tokens * mult / tp * (ctx.expert_factor[None] * sums["expert_flops"][:, :, None, :]).sum(-1), ep, 1.0, 1.0)
    dense_params = sums["dense_params"] / tp
    expert_params = (ctx.experts_per_position.max(axis=2)[None] * sums["kind_layers"]).sum(-1) \
        * tables.costs.params_per_expert / tp
    # Every pass (forward, backward, recompute) streams the stage's weights once.
    weight_bytes = ((dense_params + expert_params) * precision.param_bytes * mult)[..., None]
    parts = {"compute": cost.stage_compute_time_s(dense_flops, ctx.slowest_flops, expert_time, weight_bytes,
                                                  ctx.memory_bandwidth)}
    layers = sums["layers"][..., None]
    zero = np.zeros_like(parts["compute"])
    parts["tp_comm"] = (cost.tp_collective_time_s(tokens, hidden, act_bytes, tp, ctx.intra_bandwidth, layers,
                                                  recompute, ctx.latency) if tp > 1 else zero)
    if cp > 1:
        ring = cost.cp_ring_exchange_time_s(tokens, kv_bytes_per_token(shape, act_bytes), cp, ctx.intra_bandwidth,
                                            layers, recompute)
        scores = (tokens * mult * sums["score_flops"] / tp)[..., None] / ctx.slowest_flops
        parts["cp_comm"] = (cost.exposed_time_s(ring, scores)
                            + cost.collectives_latency_time_s(layers * cost.CP_COLLECTIVES_PER_LAYER, ctx.latency))
    else:
        parts["cp_comm"] = zero
    parts["expert_all_to_all"] = (cost.expert_all_to_all_time_s(
        tokens / tp, sums["top_k"][..., None], hidden, act_bytes, ep, ctx.all_to_all_bandwidth, recompute,
        sums["kind_layers"].sum(-1)[..., None], ctx.latency)
        if ep > 1 else zero)
    parts["pipeline_p2p"] = np.broadcast_to(ctx.p2p_time, zero.shape)

    dp_exposed = np.zeros(splits.shape[0])
    shards = degrees.dp * cp
    if shards > 1:
        reduce_scatter, all_gather = cost.dp_grad_sync_time_s(
            dense_params * precision.grad_bytes, dense_params * precision.param_bytes, shards, ctx.dp_bandwidth)
        expert_rs, expert_ag = cost.dp_grad_sync_time_s(
            expert_params * precision.grad_bytes, expert_params * precision.param_bytes, shards // ep,
            ctx.dp_bandwidth)
        # A gradient bucket is ready once every replica has produced it. Replicas finish together
        # (that is what the micro-batch split is for), so buckets come out at the pace of the
        # *fastest* replica's last backward: that is all the reduce-scatter can hide behind (and its
        # first forward of the next step, for the all-gather). A slow replica does not widen it.
        compute = parts["compute"].min(axis=2)
        dp_exposed = cost.dp_exposed_time_s(reduce_scatter + expert_rs, all_gather + expert_ag,
                                            compute * (mult - 1) / mult, compute / mult).max(axis=1)
    return dict(parts=parts, dp_exposed=dp_exposed,
                row_memory=_row_memory_bytes(ctx, sums, dense_params, expert_params))


def evaluate(ctx: GridContext, layers_per_stage, micro_batches_per_group=None) -> Evaluation:
    """Predicted step time of the layout with this layer split. Micro-batches go to replica groups by
    `allocate_units` (optimal for the 1F1B finish times) unless given."""
    g = ctx.degrees.replicas_per_expert_group
    costs = _stage_costs(ctx, np.asarray([layers_per_stage], dtype=np.int64))
    parts = {name: part[0] for name, part in costs["parts"].items()}
    stage_time = sum(parts.values())
    slowest_stage = stage_time.max(axis=0)
    bubble = cost.pipeline_bubble_time_s(stage_time, axis=0)
    if micro_batches_per_group is None:
        micro_batches_per_group = allocate_units(ctx.tables.micro_batches // g, slowest_stage, bubble, minimum=1)
    finish = cost.one_f_one_b_time_s(micro_batches_per_group, stage_time, axis=0)
    row_memory = costs["row_memory"][0]
    return Evaluation(
        step_time_s=float(finish.max() + costs["dp_exposed"][0]),
        feasible=bool((row_memory <= ctx.row_capacity).all()),
        layers_per_stage=tuple(int(x) for x in layers_per_stage),
        micro_batches_per_group=micro_batches_per_group, stage_parts=parts, bubble_s=bubble,
        dp_exposed_s=float(costs["dp_exposed"][0]), row_memory_bytes=row_memory)


def evaluate_batch(ctx: GridContext, splits) -> tuple[np.ndarray, np.ndarray]:
    """(step_time_s, feasible) for many layer splits (S, pp) at once, equal to `evaluate` with its
    optimal micro-batch split. Each group's finish times b + a*m (m = 1, 2, ...) rise with m; every
    group runs at least one micro-batch, so the best latest finish is the largest forced one or the
    extra-th smallest of all later ones: listed and partitioned when that is small, else allocated."""
    splits = np.asarray(splits, dtype=np.int64)
    costs = _stage_costs(ctx, splits)
    stage_time = sum(costs["parts"].values())
    slowest = stage_time.max(axis=1)  # (S, G)
    bubble = stage_time.sum(axis=1) - slowest
    rounds = ctx.tables.micro_batches // ctx.degrees.replicas_per_expert_group
    extra = rounds - slowest.shape[1]
    if extra <= 0:
        pipeline = (slowest + bubble).max(axis=1)
    elif slowest.size * extra <= LISTED_FINISH_TIMES:
        later = bubble[..., None] + slowest[..., None] * np.arange(2, extra + 2)
        kth = np.partition(later.reshape(len(splits), -1), extra - 1, axis=1)[:, extra - 1]
        pipeline = np.maximum((slowest + bubble).max(axis=1), kth)
    else:
        pipeline = np.array([(allocate_units(rounds, a, b, minimum=1) * a + b).max()
                             for a, b in zip(slowest, bubble)])
    feasible = (costs["row_memory"] <= ctx.row_capacity[None]).all(axis=1)
    return pipeline + costs["dp_exposed"], feasible


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


def uniform_placement(tables: ModelTables, pp: int, ep: int) -> np.ndarray:
    """Experts split as evenly as possible, in order: what a framework unaware of speed does."""
    return np.array([[even_split(e, ep) for e in tables.expert_counts] for _ in range(pp)])
