"""Token routing for the MoE layer: softmax router, top-k, per-expert capacity and *recycle routing*,
the Switch-style load-balancing loss, and the per-layer statistics reported for telemetry and for
expert-specific learning rates.

Recycle routing (Hunyuan-Large): an assignment that finds its expert full is not dropped but moved to
an expert chosen at random among those with free slots. Everything here has fixed tensor shapes, so
on a GPU it runs without a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterStats:
    """What one MoE layer did with one batch. Tensors stay on the device (no sync in forward).

    `tokens_per_expert` counts the assignments each expert computed (after capacity and recycling);
    `routed_per_expert` counts the router's own top-k choices (before capacity). The shared expert
    sees all `num_tokens`.
    """

    tokens_per_expert: torch.Tensor  # [num_experts] int64
    routed_per_expert: torch.Tensor  # [num_experts] int64
    overflow_count: torch.Tensor  # [] int64: assignments over their chosen expert's capacity
    recycled_count: torch.Tensor  # [] int64: of those, moved to an expert with room
    dropped_count: torch.Tensor  # [] int64: of those, left out (only when total capacity < tokens × k)
    num_tokens: int
    top_k: int
    capacity: int


@dataclass(frozen=True)
class Dispatch:
    """Where each of the tokens × k assignments goes, in priority order (all first choices, then all
    second choices, ...). A dropped assignment has `expert_index == num_experts` and weight 0."""

    token_index: torch.Tensor  # [A] int64
    expert_index: torch.Tensor  # [A] int64, num_experts for dropped
    weight: torch.Tensor  # [A] float: the router's gate value for the expert first chosen
    recycled: torch.Tensor  # [A] bool
    num_experts: int


def count_per_expert(expert_index: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of 0..size-1 occurs. Unlike torch.bincount, a fixed-size scatter: bincount
    reads the maximum back to the host to size its output, a sync per layer on a GPU."""
    counts = torch.zeros(size, dtype=torch.long, device=expert_index.device)
    return counts.scatter_add_(0, expert_index, torch.ones_like(expert_index))


def capacity_per_expert(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor × tokens × k / experts) slots per expert (at least one)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def recycle_route(expert_choice: torch.Tensor, gate_weight: torch.Tensor, num_experts: int,
                  capacity: int, generator: torch.Generator) -> tuple[Dispatch, RouterStats]:
    """Apply capacity to top-k choices and recycle the overflow.

    expert_choice, gate_weight: [tokens, k]. Assignments claim slots in priority order (first choices
    of all tokens before any second choice, then token order). Each overflowing assignment takes a
    free slot drawn uniformly at random (from `generator`) among all free slots left after the first
    pass, so an expert is picked in proportion to its room and never past its capacity; with total
    capacity ≥ tokens × k every assignment is placed.

    With k > 1 a recycled assignment can land on an expert the same token already uses; its output
    then counts with both gate weights. That keeps the placement one vectorized pass.
    """
    num_tokens, top_k = expert_choice.shape
    device = expert_choice.device
    expert_flat = expert_choice.t().reshape(-1)  # slot-major: priority order
    weight_flat = gate_weight.t().reshape(-1)
    token_flat = torch.arange(num_tokens, device=device).repeat(top_k)

    # A comparison, not F.one_hot: one_hot checks the index range on the host (a GPU sync).
    one_hot = (expert_flat.unsqueeze(1) == torch.arange(num_experts, device=device)).long()
    rank_in_expert = (one_hot.cumsum(0) * one_hot).sum(1) - 1
    kept = rank_in_expert < capacity
    routed_per_expert = one_hot.sum(0)
    kept_per_expert = routed_per_expert.clamp(max=capacity)
    room = capacity - kept_per_expert  # [E] free slots after the first pass

    # Free slots as an [E, capacity] grid; slot s of expert e is free when s < room[e]. A random key
    # per free slot, sorted, is a uniform random order of the free slots.
    slot = torch.arange(capacity, device=device)
    slot_free = slot.unsqueeze(0) < room.unsqueeze(1)
    keys = torch.rand((num_experts, capacity), generator=generator, device=device)
    keys = keys.masked_fill(~slot_free, 2.0)  # occupied slots sort after every free one
    slot_order = keys.reshape(-1).argsort()
    slot_expert = slot_order // capacity  # expert owning the j-th free slot in random order
    free_slots = room.sum()

    overflow = ~kept
    overflow_rank = overflow.long().cumsum(0) - 1  # j for the j-th overflowing assignment
    placed = overflow & (overflow_rank < free_slots)
    target = slot_expert[overflow_rank.clamp(min=0, max=slot_expert.numel() - 1)]
    dropped_marker = torch.full_like(expert_flat, num_experts)
    new_expert = torch.where(kept, expert_flat, torch.where(placed, target, dropped_marker))
    new_weight = torch.where(new_expert < num_experts, weight_flat, torch.zeros_like(weight_flat))

    tokens_per_expert = count_per_expert(new_expert, num_experts + 1)[:num_experts]
    overflow_count = overflow.sum()
    recycled_count = placed.sum()
    stats = RouterStats(
        tokens_per_expert=tokens_per_expert, routed_per_expert=routed_per_expert,
        overflow_count=overflow_count, recycled_count=recycled_count,
        dropped_count=overflow_count - recycled_count,
        num_tokens=num_tokens, top_k=top_k, capacity=capacity)
    dispatch = Dispatch(token_index=token_flat, expert_index=new_expert, weight=new_weight,
                        recycled=placed, num_experts=num_experts)
    return dispatch, stats


def load_balancing_loss(router_probs: torch.Tensor, expert_choice: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: N × Σ_e f_e × P_e.

    f_e is the fraction of the router's top-k choices that went to expert e (not differentiable),
    P_e the mean router probability for e. It is 1.0 when routing is perfectly uniform.
    """
    counts = count_per_expert(expert_choice.reshape(-1), num_experts).to(router_probs.dtype)
    fraction = counts / expert_choice.numel()
    mean_prob = router_probs.mean(0)
    return num_experts * (fraction * mean_prob).sum()


class BalanceLoss(Protocol):
    """(router probs [tokens, E], top-k choices [tokens, k], E) → the load-balancing loss. Context
    parallelism swaps in one over the whole sequence's counts and probabilities."""

    def __call__(self, router_probs: torch.Tensor, expert_choice: torch.Tensor,
                 num_experts: int) -> torch.Tensor: ...


class Router(nn.Module):
    """Linear gate → softmax → top-k → capacity with recycling.

    Gate weights are the raw softmax probabilities of the chosen experts, so the task loss trains the
    gate even with top-1; or, with `renormalize`, those probabilities divided by their sum. Recycling
    draws its randomness from a generator seeded by (recycle_seed, layer, routing step): the same step
    gives the same assignment, which keeps activation recomputation, resumed runs and every
    data-parallel rank consistent.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: float,
                 recycle_seed: int, layer_index: int, renormalize: bool = False) -> None:
        super().__init__()
        self.renormalize = renormalize
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.recycle_seed = recycle_seed
        self.layer_index = layer_index
        self.routing_step = 0  # set by MoETransformer.set_routing_step
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # Context parallelism replaces this (and only this): one routing forward for both paths.
        self.balance_loss: BalanceLoss = load_balancing_loss

    def forward(self, x: torch.Tensor) -> tuple[Dispatch, torch.Tensor, RouterStats]:
        """x: [tokens, hidden] → (dispatch, aux loss, stats)."""
        # Router math in fp32: bf16 softmax ties and rounding would make top-k choices unstable.
        probs = F.softmax(self.gate(x).float(), dim=-1)
        gate_weight, expert_choice = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            gate_weight = gate_weight / gate_weight.sum(dim=-1, keepdim=True)
        capacity = capacity_per_expert(self.capacity_factor, x.shape[0], self.top_k, self.num_experts)
        dispatch, stats = recycle_route(expert_choice, gate_weight, self.num_experts, capacity,
                                        self._generator(x.device))
        aux_loss = self.balance_loss(probs, expert_choice, self.num_experts)
        return dispatch, aux_loss, stats

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        # Mix the three numbers into one seed; large odd multipliers keep nearby steps and layers apart.
        seed = (self.recycle_seed * 1_000_003 + self.layer_index * 7_919 + self.routing_step * 104_729)
        generator.manual_seed(seed % (2**63 - 1))
        return generator
