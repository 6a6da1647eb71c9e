"""Grouped-query attention with cross-layer attention (CLA).

A producer layer projects K/V and hands them on; a consumer layer has no K/V projection at all and
attends with the K/V of the producer before it, which is what shrinks the KV cache (see
`ModelConfig.kv_cache_ratio_vs_mha`). Which keys/values a layer attends to is a swappable `GatherKV`:
its own sequence here, the whole sequence gathered over the cp group under context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope


@dataclass(frozen=True)
class SharedKV:
    """K and V after RoPE and QK-norm, [batch, kv_heads, seq, head_dim], passed producer → consumers."""

    key: torch.Tensor
    value: torch.Tensor


class GatherKV(Protocol):
    """This rank's K/V → (key, value, mask) to attend to. mask None means causal over `key` as is;
    otherwise a bool [q_seq, kv_seq] mask (True attends), for K/V that are not this rank's own."""

    def __call__(self, kv: SharedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


def local_kv(kv: SharedKV) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The whole sequence is on this rank: attend causally to its own K/V."""
    return kv.key, kv.value, None


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [batch, 1, seq, seq] from segment ids [batch, seq]: causal, and only inside the same packed
    document (True attends)."""
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


class Attention(nn.Module):
    """Causal GQA through `scaled_dot_product_attention`; K/V projections only in producer layers."""

    # Projection names for tensor parallelism: column-parallel ones split heads, the row-parallel one
    # reduces them. Consumers lack k_proj/v_proj, so ask `projection_names()` per layer.
    COLWISE_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
    ROWWISE_PROJECTIONS = ("o_proj",)

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.is_kv_consumer = config.is_kv_consumer(layer_index)
        hidden = config.hidden_size
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=False)
        self.o_proj = nn.Linear(q_width, hidden, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        if self.is_kv_consumer:
            # No k_proj/v_proj at all (not merely unused): DDP then needs no find_unused_parameters,
            # and the parameter count matches the formula.
            self.k_proj = self.v_proj = self.k_norm = None
        else:
            self.k_proj = nn.Linear(hidden, kv_width, bias=False)
            self.v_proj = nn.Linear(hidden, kv_width, bias=False)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        # Context parallelism replaces this (and only this): one forward for both paths.
        self.gather_kv: GatherKV = local_kv

    def projection_names(self) -> dict[str, tuple[str, ...]]:
        present = lambda names: tuple(n for n in names if getattr(self, n) is not None)  # noqa: E731
        return {"colwise": present(self.COLWISE_PROJECTIONS), "rowwise": self.ROWWISE_PROJECTIONS}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                shared_kv: SharedKV | None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SharedKV]:
        """mask: a `document_mask` over this rank's own sequence, or None for plain causal attention."""
        batch, seq, _ = x.shape
        q = apply_rope(self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        if self.q_norm is not None:
            q = self.q_norm(q)  # after RoPE, as Hunyuan does: the exported model computes the same
        if self.is_kv_consumer:
            if shared_kv is None:
                raise ValueError("a CLA consumer layer needs the K/V of its producer layer; run the "
                                 "blocks in order, or start a pipeline stage at a producer layer")
            kv = shared_kv
        else:
            kv = self._project_kv(x, cos, sin)
        key, value, gathered_mask = self.gather_kv(kv)
        if mask is not None and gathered_mask is not None:
            raise ValueError("document masks are not built for context parallelism: set data.document_mask: false "
                             "or cp: 1")
        mask = gathered_mask if mask is None else mask
        # No mask: SDPA's is_causal path, which never materializes a [seq, seq] mask.
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        # This rank's K/V, not the gathered ones: a CLA consumer gathers again from its own chunks.
        return self.o_proj(out), kv

    def _project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> SharedKV:
        batch, seq, _ = x.shape
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return SharedKV(key=k, value=v)
