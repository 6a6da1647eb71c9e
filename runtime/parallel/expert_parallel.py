"""Expert parallelism: each ep rank holds the routed experts the plan places on it; tokens travel to
their experts and back with `all_to_all_single` (variable split sizes, autograd through both).

Routing (top-k, capacity, recycle routing) is unchanged and runs where the tokens are, before the
dispatch; only the expert computation moves. Expert gradients arrive summed over the ep group, so a
hook divides them by dp·cp (the mean every dense gradient gets from FSDP); with edp > 1 replicas of
an expert shard, `sync_expert_gradients` then sums them over edp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from hyrun.runtime.model.experts import GroupedExperts
from hyrun.runtime.model.routing import Dispatch
from hyrun.runtime.model.routing import count_per_expert

from .timing import CommTimer


def contiguous_placement(num_experts: int, ep: int) -> tuple[int, ...]:
    """Expert e → ep rank, equal contiguous blocks (the default when the plan gives none)."""
    if num_experts % ep:
        raise ValueError(f"ep={ep} must divide num_experts={num_experts} when no placement is given")
    per_rank = num_experts // ep
    return tuple(e // per_rank for e in range(num_experts))


def apply_expert_parallel(experts: GroupedExperts, *, placement: Sequence[int], ep_rank: int,
                          ep_group: dist.ProcessGroup, grad_divide_factor: int,
                          comm_timer: CommTimer) -> None:
    """Keep only this rank's experts (in place) and route tokens to the owners of the others."""
    ep = dist.get_world_size(ep_group)
    if len(placement) != experts.num_experts or not all(0 <= owner < ep for owner in placement):
        raise ValueError(f"expert placement {tuple(placement)} must give each of {experts.num_experts} "
                         f"experts an ep rank in [0, {ep})")
    owner = torch.tensor(placement, dtype=torch.long)
    local = [e for e in range(experts.num_experts) if placement[e] == ep_rank]
    # local_index[e]: e's position among its owner's experts (the owner's local expert id).
    local_index = torch.zeros_like(owner)
    for rank in range(ep):
        owned = (owner == rank).nonzero().squeeze(1)
        local_index[owned] = torch.arange(owned.numel())
    with torch.no_grad():
        gate_up = experts.w_gate_up[local].clone()
        down = experts.w_down[local].clone()
    experts.w_gate_up = nn.Parameter(gate_up)
    experts.w_down = nn.Parameter(down)
    for param in (experts.w_gate_up, experts.w_down):
        param.register_hook(lambda grad: grad / grad_divide_factor)
    experts.__class__ = ExpertParallelExperts
    experts.num_global_experts = experts.num_experts
    experts.num_experts = len(local)
    experts.local_experts = tuple(local)
    experts.owner, experts.local_index = owner, local_index
    experts.ep_group, experts.ep_size, experts.comm_timer = ep_group, ep, comm_timer


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts holding `local_experts` of `num_global_experts`; forward takes the dispatch in
    global expert ids, exactly like GroupedExperts, and returns the same combined output."""

    num_global_experts: int
    local_experts: tuple[int, ...]
    owner: torch.Tensor
    local_index: torch.Tensor
    ep_group: dist.ProcessGroup
    ep_size: int
    comm_timer: CommTimer

    def forward(self, x: torch.Tensor, dispatch: Dispatch, path=None) -> torch.Tensor:
        kept = dispatch.expert_index < self.num_global_experts  # dropped assignments stay home
        token_index = dispatch.token_index[kept]
        expert_index = dispatch.expert_index[kept]
        weight = dispatch.weight[kept]
        owner = self.owner.to(x.device)[expert_index]
        # Sorted by (owner, expert): one contiguous block per destination, experts grouped within.
        order = (owner * self.num_global_experts + expert_index).argsort(stable=True)
        token_index, expert_index, weight, owner = (t[order] for t in (token_index, expert_index, weight, owner))
        send_counts = count_per_expert(owner, self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        with self.comm_timer:
            dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()

        local_ids = self.local_index.to(x.device)[expert_index]
        recv_ids = local_ids.new_empty(sum(recv_splits))
        with self.comm_timer:
            dist.all_to_all_single(recv_ids, local_ids, recv_splits, send_splits, group=self.ep_group)
            rows = dist_nn.all_to_all_single(x.new_empty(sum(recv_splits), x.shape[1]), x[token_index],
                                             recv_splits, send_splits, group=self.ep_group)
        received = rows.shape[0]
        local_dispatch = Dispatch(
            token_index=torch.arange(received, device=x.device), expert_index=recv_ids,
            weight=torch.ones(received, dtype=x.dtype, device=x.device),
            recycled=torch.zeros(received, dtype=torch.bool, device=x.device), num_experts=self.num_experts)
        computed = super().forward(rows, local_dispatch, path)  # one row per received assignment
        with self.comm_timer:
            returned = dist_nn.all_to_all_single(x.new_empty(token_index.shape[0], x.shape[1]), computed,
                                                 send_splits, recv_splits, group=self.ep_group)
        weighted = returned * weight.unsqueeze(1).to(returned.dtype)
        return torch.zeros_like(x).index_add(0, token_index, weighted)


def sync_expert_gradients(model: nn.Module, edp_group: dist.ProcessGroup | None) -> None:
    """Sum expert gradients over the replicas of each expert shard (no-op when edp = 1)."""
    if edp_group is None or dist.get_world_size(edp_group) == 1:
        return
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            for param in (module.w_gate_up, module.w_down):
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=edp_group)
