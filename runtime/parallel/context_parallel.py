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
import torch.nn.functional as F

from hyrun.runtime.model.attention import Attention, SharedKV
from hyrun.runtime.model.routing import Router, capacity_per_expert, count_per_expert, recycle_route
from hyrun.runtime.model.rope import apply_rope

from .stage import StageTransformer, chunk_positions
from .timing import CommTimer


def apply_context_parallel(model: StageTransformer, cp_group: dist.ProcessGroup, comm_timer: CommTimer) -> None:
    for block in model.blocks.values():
        block.attention.__class__ = ContextParallelAttention
        block.attention.cp_group, block.attention.comm_timer = cp_group, comm_timer
        block.moe.router.__class__ = ContextParallelRouter
        block.moe.router.cp_group = cp_group


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


class ContextParallelAttention(Attention):
    """Attention over this rank's query chunks and the whole sequence's keys and values."""

    cp_group: dist.ProcessGroup
    comm_timer: CommTimer

    def forward(self, x, cos, sin, shared_kv):
        batch, local_seq, _ = x.shape
        size, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        q = self.q_proj(x).view(batch, local_seq, self.num_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        if self.is_kv_consumer:
            if shared_kv is None:
                raise ValueError("a CLA consumer layer needs the K/V of its producer layer")
            kv = shared_kv  # this rank's chunks, as the producer projected them
        else:
            kv = self._project_kv(x, cos, sin)
        with self.comm_timer:
            key, value = _gather_sequence(kv.key, self.cp_group), _gather_sequence(kv.value, self.cp_group)
        q_pos = chunk_positions(local_seq * size, rank, size, x.device)
        k_pos = torch.arange(local_seq * size, device=x.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # causal in global positions
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(batch, local_seq, self.num_heads * self.head_dim)
        return self.o_proj(out), SharedKV(key=kv.key, value=kv.value)


class ContextParallelRouter(Router):
    """Routes this rank's tokens as the Router does; the load-balancing loss N·Σ f_e·P_e uses the
    counts and mean probabilities of the whole sequence (summed over the cp ring), so it equals the
    single-rank loss. Capacity stays per rank's tokens."""

    cp_group: dist.ProcessGroup

    def forward(self, x):
        probs = F.softmax(self.gate(x).float(), dim=-1)
        gate_weight, expert_choice = probs.topk(self.top_k, dim=-1)
        capacity = capacity_per_expert(self.capacity_factor, x.shape[0], self.top_k, self.num_experts)
        dispatch, stats = recycle_route(expert_choice, gate_weight, self.num_experts, capacity,
                                        self._generator(x.device))
        counts = count_per_expert(expert_choice.reshape(-1), self.num_experts).to(probs.dtype)
        totals = torch.cat([counts, counts.new_tensor([expert_choice.numel(), x.shape[0]])])
        dist.all_reduce(totals, group=self.cp_group)
        prob_sum = dist_nn.all_reduce(probs.sum(0), group=self.cp_group)
        fraction = totals[:-2] / totals[-2]
        aux_loss = self.num_experts * (fraction * prob_sum / totals[-1]).sum()
        return dispatch, aux_loss, stats
