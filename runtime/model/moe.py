"""The MoE feed-forward of one layer: a shared SwiGLU expert on every token plus routed experts
chosen per token by the router (with capacity and recycle routing)."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .experts import ExpertPath, GroupedExperts, SwiGLU
from .routing import Router, RouterStats


class MoEFeedForward(nn.Module):
    """shared_expert(x) + Σ_k gate_k · expert_k(x)."""

    def __init__(self, config: ModelConfig, layer_index: int, expert_path: ExpertPath = "auto") -> None:
        super().__init__()
        num_experts = config.experts_in_layer(layer_index)
        self.shared_expert = (SwiGLU(config.hidden_size, config.shared_ffn_size)
                              if config.shared_ffn_size > 0 else None)
        self.router = Router(config.hidden_size, num_experts, config.top_k_in_layer(layer_index),
                             config.capacity_factor, config.recycle_seed, layer_index,
                             config.router_renormalize)
        self.experts = GroupedExperts(num_experts, config.hidden_size, config.expert_ffn_size, expert_path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """x: [batch, seq, hidden] → (output like x, aux loss, router stats)."""
        flat = x.reshape(-1, x.shape[-1])
        dispatch, aux_loss, stats = self.router(flat)
        out = self.experts(flat, dispatch)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        return out.view_as(x), aux_loss, stats
