"""The cost model's terms, each a pure function of plain numbers (floats or numpy arrays, elementwise),
so the search can apply them to a whole pipeline grid at once and tests can check each one alone.

Times are seconds for one micro-batch unless the name says otherwise; sizes are bytes; bandwidths are
bytes per second per direction per card.
"""

from __future__ import annotations

import numpy as np

# Sustained share of datasheet peak in real MoE training (dense GEMMs reach 50-60%, routed-expert
# GEMMs on small token groups less; published Megatron/DeepSeek runs report 35-45% MFU). One number
# for every card: what differs between cards is measured and folded into `speed` by `calibrate`.
ACHIEVED_FLOPS_FRACTION = 0.45

# Share of a card's memory the plan may fill: the CUDA context, NCCL buffers and allocator
# fragmentation take the rest, and an OOM mid-run costs far more than a slightly smaller plan.
USABLE_MEMORY_FRACTION = 0.9

# Collectives per transformer layer per micro-batch under tensor parallelism (Megatron-style with
# sequence parallelism: a reduce-scatter + all-gather pair moves what one all-reduce does): one after
# attention and one after the MoE block, in forward and again in backward.
TP_COLLECTIVES_PER_LAYER = 4
# Dispatch and combine in forward, their mirror images in backward.
ALL_TO_ALLS_PER_MOE_LAYER = 4
# What a layer's context-parallel attention waits on: K and V gathered in forward, their gradients
# reduced in backward.
CP_COLLECTIVES_PER_LAYER = 4


def compute_time_s(flops, flops_per_s, bytes_moved=0.0, memory_bandwidth_bytes_per_s=np.inf):
    """Roofline: a kernel is bound by arithmetic or by memory traffic, whichever is slower."""
    return np.maximum(flops / flops_per_s, bytes_moved / memory_bandwidth_bytes_per_s)


def expert_compute_time_s(expert_flops, ep, expert_share, flops_per_s):
    """Routed-expert work of one rank: its expert group pools ep ranks' tokens, and this rank computes
    the share of them its experts receive (`expert_share` = its experts / experts in the layer, 1/ep
    when experts are split evenly). `expert_flops`: what the rank's own tokens would cost alone."""
    return expert_flops * ep * expert_share / flops_per_s


def stage_compute_time_s(dense_flops, flops_per_s, expert_time_s, weight_bytes, memory_bandwidth_bytes_per_s):
    """One micro-batch's forward and backward through a stage on a card: dense FLOPs at the card's rate
    plus its routed-expert time, unless streaming the stage's weights takes longer (roofline)."""
    return np.maximum(dense_flops / flops_per_s + expert_time_s, weight_bytes / memory_bandwidth_bytes_per_s)


def ring_all_reduce_time_s(message_bytes, group_size, bandwidth_bytes_per_s):
    """Bandwidth term of a ring all-reduce: every rank sends 2(n-1)/n of the message."""
    n = np.asarray(group_size, dtype=np.float64)
    return np.where(n > 1, 2 * (n - 1) / np.maximum(n, 1) * message_bytes / bandwidth_bytes_per_s, 0.0)


def ring_reduce_scatter_time_s(message_bytes, group_size, bandwidth_bytes_per_s):
    """Each rank sends (n-1)/n of the full message; an all-gather of the same message costs the same."""
    n = np.asarray(group_size, dtype=np.float64)
    return np.where(n > 1, (n - 1) / np.maximum(n, 1) * message_bytes / bandwidth_bytes_per_s, 0.0)


ring_all_gather_time_s = ring_reduce_scatter_time_s


def tp_collective_time_s(tokens, hidden_size, activation_bytes, tp, bandwidth_bytes_per_s, num_layers,
                         recompute, latency_s=0.0):
    """Tensor-parallel all-reduces of the layer outputs for one micro-batch over `num_layers` layers;
    recomputation replays the two forward ones. Each costs its bytes plus a fixed `latency_s`."""
    per_layer = TP_COLLECTIVES_PER_LAYER + (2 if recompute else 0)
    message = tokens * hidden_size * activation_bytes
    return num_layers * per_layer * (ring_all_reduce_time_s(message, tp, bandwidth_bytes_per_s) + latency_s)


def cp_ring_exchange_time_s(tokens_per_rank, kv_bytes_per_token, cp, bandwidth_bytes_per_s, num_layers,
                            recompute):
    """Ring attention: each layer's K/V chunk travels cp-1 hops in forward; backward sends K/V and their
    gradients around again (2 chunks per hop); recomputation replays the forward ring."""
    hops = np.maximum(np.asarray(cp, dtype=np.float64) - 1, 0)
    chunk = tokens_per_rank * kv_bytes_per_token
    passes = 3 + (1 if recompute else 0)
    return num_layers * passes * hops * chunk / bandwidth_bytes_per_s


def collectives_latency_time_s(collectives, latency_s):
    """The fixed part of `collectives` collectives: not hidden behind compute (each waits on its peers)."""
    return collectives * latency_s


def exposed_time_s(communication_s, overlapping_compute_s):
    """What of a transfer is left on the critical path after hiding it behind independent compute."""
    return np.maximum(communication_s - overlapping_compute_s, 0.0)


def expert_all_to_all_time_s(tokens, top_k_total, hidden_size, activation_bytes, ep, bandwidth_bytes_per_s,
                             recompute, moe_layers=0.0, latency_s=0.0):
    """Token dispatch and combine over `ep` ranks. `top_k_total` sums top_k over the MoE layers in
    question: each routed copy of a token is one hidden vector, and (ep-1)/ep of the copies leave the
    rank when routing is balanced."""
    ep = np.asarray(ep, dtype=np.float64)
    per_layer = ALL_TO_ALLS_PER_MOE_LAYER + (2 if recompute else 0)
    leaving = (ep - 1) / np.maximum(ep, 1)
    volume_s = per_layer * tokens * top_k_total * hidden_size * activation_bytes * leaving / bandwidth_bytes_per_s
    return volume_s + np.where(ep > 1, per_layer * moe_layers * latency_s, 0.0)


def pipeline_p2p_time_s(tokens, hidden_size, activation_bytes, tp, bandwidth_bytes_per_s, messages):
    """Activations (forward) or their gradients (backward) sent to a neighbouring stage; with sequence
    parallelism each TP rank sends its 1/tp slice."""
    return messages * tokens * hidden_size * activation_bytes / tp / bandwidth_bytes_per_s


def one_f_one_b_time_s(micro_batches, stage_times_s, axis=0):
    """1F1B pipeline of stages that take `stage_times_s` per micro-batch (forward + backward): the
    slowest stage paces the steady state, and the fill and drain add every other stage once."""
    stage_times_s = np.asarray(stage_times_s, dtype=np.float64)
    slowest = stage_times_s.max(axis=axis)
    return micro_batches * slowest + pipeline_bubble_time_s(stage_times_s, axis=axis)


def pipeline_bubble_time_s(stage_times_s, axis=0):
    """Fill and drain of a 1F1B pipeline: (pp-1) stage times for equal stages, 0 without a pipeline."""
    stage_times_s = np.asarray(stage_times_s, dtype=np.float64)
    return stage_times_s.sum(axis=axis) - stage_times_s.max(axis=axis)


def dp_grad_sync_time_s(grad_bytes, param_bytes, group_size, bandwidth_bytes_per_s):
    """Distributed-optimizer data parallelism: reduce-scatter the gradients, each rank updates its
    1/n shard, all-gather the new parameters. Returns (reduce_scatter_s, all_gather_s)."""
    return (ring_reduce_scatter_time_s(grad_bytes, group_size, bandwidth_bytes_per_s),
            ring_all_gather_time_s(param_bytes, group_size, bandwidth_bytes_per_s))


def dp_exposed_time_s(reduce_scatter_s, all_gather_s, backward_overlap_s, forward_overlap_s):
    """Bucketed reduce-scatter runs under the last micro-batch's backward, the all-gather under the next
    step's first forward; only what does not fit behind them adds to the step."""
    return exposed_time_s(reduce_scatter_s, backward_overlap_s) + exposed_time_s(all_gather_s, forward_overlap_s)


def straggler_wait_time_s(step_time_s, busy_time_s):
    """Mean time ranks sit idle waiting for slower ones (busy_time_s: one entry per rank)."""
    busy_time_s = np.asarray(busy_time_s, dtype=np.float64)
    return float(np.mean(np.maximum(step_time_s - busy_time_s, 0.0)))


# --- memory per card --------------------------------------------------------------------------------

def param_memory_bytes(num_params, param_bytes):
    return num_params * param_bytes


def grad_memory_bytes(num_params, grad_bytes):
    return num_params * grad_bytes


def optimizer_memory_bytes(num_params, optimizer_bytes_per_param, shard_degree):
    """Optimizer state sharded over `shard_degree` data-parallel ranks (ZeRO-1 / distributed optimizer)."""
    return num_params * optimizer_bytes_per_param / shard_degree


def in_flight_micro_batches(stage, pp, micro_batches):
    """1F1B: stage s starts pp-s forwards before its first backward frees one (fewer if the replica
    has fewer micro-batches)."""
    return np.minimum(pp - np.asarray(stage), micro_batches)


def activation_memory_bytes(tokens, bytes_per_token, in_flight, tp, working_set_bytes=0.0):
    """Activations kept for backward, split over the TP group (sequence parallelism), plus a working set
    that exists once (e.g. the layer being recomputed)."""
    return in_flight * tokens * bytes_per_token / tp + working_set_bytes


def logits_memory_bytes(tokens, vocab_size, tp):
    """Last stage: fp32 logits and their gradient for one micro-batch, vocab split over TP."""
    return 8.0 * tokens * vocab_size / tp


def usable_memory_bytes(memory_bytes):
    return memory_bytes * USABLE_MEMORY_FRACTION
