"""Context parallelism: each cp rank holds two chunks of every sequence (r and 2n−1−r, the causal
load balance), attends its queries to the keys/values of the whole sequence, and the router's
load-balancing loss is computed from counts and probabilities summed over the ring.

torch's `context_parallel` does not run here: it rewrites only the CUDA SDPA kernels (flash,
efficient, cuDNN), not the CPU one. Keys/values are all-gathered (autograd through the gather),
which for the cp ≤ 4 this runtime uses moves what a ring would; a send/recv ring overlapping
attention with the exchange is the next step for long sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from hyrun.runtime.model.attention import SharedKV
from hyrun.runtime.model.routing import count_per_expert

from .stage import StageTransformer, chunk_positions
from .timing import CommTimer


def apply_context_parallel(model: StageTransformer, cp_group: dist.ProcessGroup, comm_timer: CommTimer) -> None:
    """Swap in how K/V and the balance loss see the whole sequence; the forwards stay the model's."""
    gather_kv, balance_loss = GatherSequenceKV(cp_group, comm_timer), RingBalanceLoss(cp_group)
    for block in model.blocks.values():
        block.attention.gather_kv = gather_kv
        block.moe.router.balance_loss = balance_loss


class _AllGather(torch.autograd.Function):
    """all_gather with a backward that sums each part's gradient over the ranks that used it.

    Written here because torch.distributed.nn's all_gather backward (an all-to-all built from
    scatters) names group ranks as global ranks and fails on any group that is not the world
    (e.g. cp = 2 inside dp = 2): torch 2.13, gloo.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup):
        ctx.group = group
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        stacked = torch.stack([g if g is not None else torch.zeros_like(grads[0]) for g in grads]).contiguous()
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[dist.get_rank(ctx.group)], None


def _gather_sequence(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, h, local_seq, d] from every cp rank → [b, h, seq, d] in sequence order."""
    size = dist.get_world_size(group)
    parts = _AllGather.apply(t.contiguous(), group)
    chunks: list[torch.Tensor | None] = [None] * (2 * size)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=2)
        chunks[r], chunks[2 * size - 1 - r] = first, second
    return torch.cat(chunks, dim=2)


class GatherSequenceKV:
    """K/V of the whole sequence from this rank's two chunks, with the causal mask in global
    positions: the model's attention forward runs unchanged with this as its `gather_kv`."""

    def __init__(self, cp_group: dist.ProcessGroup, comm_timer: CommTimer) -> None:
        self.cp_group, self.comm_timer = cp_group, comm_timer

    def __call__(self, kv: SharedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        local_seq, device = kv.key.shape[2], kv.key.device
        with self.comm_timer:
            key, value = _gather_sequence(kv.key, self.cp_group), _gather_sequence(kv.value, self.cp_group)
        q_pos = chunk_positions(local_seq * size, rank, size, device)
        k_pos = torch.arange(local_seq * size, device=device)
        return key, value, k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # causal in global positions


class RingBalanceLoss:
    """The load-balancing loss N·Σ f_e·P_e from the counts and mean probabilities of the whole
    sequence (summed over the cp ring), so it equals the single-rank loss. Routing itself (and so
    capacity) stays per rank's tokens: the model's router forward runs unchanged."""

    def __init__(self, cp_group: dist.ProcessGroup) -> None:
        self.cp_group = cp_group

    def __call__(self, router_probs: torch.Tensor, expert_choice: torch.Tensor, num_experts: int) -> torch.Tensor:
        counts = count_per_expert(expert_choice.reshape(-1), num_experts).to(router_probs.dtype)
        totals = torch.cat([counts, counts.new_tensor([expert_choice.numel(), router_probs.shape[0]])])
        dist.all_reduce(totals, group=self.cp_group)  # counts are not differentiable: plain all-reduce
        prob_sum = dist_nn.all_reduce(router_probs.sum(0), group=self.cp_group)  # P_e is: autograd
        fraction = totals[:-2] / totals[-2]
        return num_experts * (fraction * prob_sum / totals[-1]).sum()
