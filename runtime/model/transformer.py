"""The Hunyuan-Large-style decoder: embedding, a list of blocks (attention with CLA, then MoE), final
norm and LM head. Pure PyTorch: parallelism is applied from outside, using `blocks` (pipeline split),
`tensor_parallel_plan()` (TP) and each block's stacked `moe.experts` (EP on dim 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, SharedKV, document_mask
from .config import ModelConfig
from .experts import ExpertPath, GroupedExperts, resolve_expert_path
from .moe import MoEFeedForward
from .norm import RMSNorm
from .rope import rope_table
from .routing import RouterStats


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor  # [batch, seq, vocab]
    aux_loss: torch.Tensor  # [] load-balancing loss, mean over layers, not yet multiplied by the coeff
    router_stats: tuple[RouterStats, ...]  # one per layer
    aux_loss_coeff: float  # the config's coefficient, for lm_loss


@dataclass(frozen=True)
class BlockOutput:
    hidden: torch.Tensor
    shared_kv: SharedKV  # K/V this block attended with, for the CLA consumers after it
    aux_loss: torch.Tensor
    router_stats: RouterStats


class Block(nn.Module):
    """Pre-norm decoder layer: x + attention(norm(x)), then + moe(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, expert_path: ExpertPath = "auto") -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = Attention(config, layer_index)
        self.moe_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.moe = MoEFeedForward(config, layer_index, expert_path)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                shared_kv: SharedKV | None = None, mask: torch.Tensor | None = None) -> BlockOutput:
        attended, kv = self.attention(self.attention_norm(x), cos, sin, shared_kv, mask)
        x = x + attended
        moe_out, aux_loss, stats = self.moe(self.moe_norm(x))
        return BlockOutput(hidden=x + moe_out, shared_kv=kv, aux_loss=aux_loss, router_stats=stats)


class MoETransformer(nn.Module):
    """forward(tokens [batch, seq]) → ModelOutput(logits, aux_loss, router_stats)."""

    def __init__(self, config: ModelConfig, expert_path: ExpertPath = "auto") -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, expert_path) for i in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        cos, sin = rope_table(config.head_dim, config.max_seq_len, config.rope_base)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; output projections (attention o_proj, expert down
        projections) scaled by 1/sqrt(2·layers) so the residual stream does not grow with depth.
        Deterministic under `torch.manual_seed` (module order fixes the draw order)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if is_output else std)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w_gate_up, std=std)
                nn.init.normal_(module.w_down, std=out_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> ModelOutput:
        """segment_ids [batch, seq]: attention stays inside each packed document; None: plain causal."""
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}; "
                             "raise max_seq_len in the model config or shorten the batch")
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.embedding(tokens)
        mask = document_mask(segment_ids) if segment_ids is not None else None
        shared_kv, aux_losses, stats = None, [], []
        for block in self.blocks:
            out = block(x, cos, sin, shared_kv, mask)
            x, shared_kv = out.hidden, out.shared_kv
            aux_losses.append(out.aux_loss)
            stats.append(out.router_stats)
        logits = self.lm_head(self.final_norm(x))
        return ModelOutput(logits=logits, aux_loss=torch.stack(aux_losses).mean(),
                           router_stats=tuple(stats), aux_loss_coeff=self.config.aux_loss_coeff)

    def set_rope_base(self, base: float) -> None:
        """A new RoPE base (a long-context stage): the tables change in place, their shape does not."""
        cos, sin = rope_table(self.config.head_dim, self.config.max_seq_len, base)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # --- what the parallel layer needs -----------------------------------------------------------

    def set_routing_step(self, step: int) -> None:
        """Seed recycle routing for this training step (call before forward; resumes reproduce)."""
        for block in self.blocks:
            block.moe.router.routing_step = step

    def set_expert_path(self, path: ExpertPath) -> None:
        """Override how routed experts run ("auto" picks grouped_mm on CUDA, the loop elsewhere)."""
        resolve_expert_path(path, self.embedding.weight.device)  # reject unknown names now
        for experts in self.experts():
            experts.path = path

    def experts(self) -> list[GroupedExperts]:
        """Each layer's stacked routed experts (shard dim 0 for expert parallelism)."""
        return [block.moe.experts for block in self.blocks]

    def layer_indices(self) -> list[int]:
        """The model-wide index of each layer this module holds (all of them; a pipeline stage some)."""
        return list(range(len(self.blocks)))

    def tensor_parallel_plan(self) -> dict[str, str]:
        """Fully qualified module name → "colwise" | "rowwise" for every dense projection.

        Routed experts are absent: they are split across cards by expert parallelism, not TP.
        """
        plan: dict[str, str] = {}
        for i, block in enumerate(self.blocks):
            for kind, names in block.attention.projection_names().items():
                plan.update({f"blocks.{i}.attention.{n}": kind for n in names})
            if block.moe.shared_expert is not None:
                prefix, shared = f"blocks.{i}.moe.shared_expert", block.moe.shared_expert
                plan.update({f"{prefix}.{n}": "colwise" for n in shared.COLWISE_PROJECTIONS})
                plan.update({f"{prefix}.{n}": "rowwise" for n in shared.ROWWISE_PROJECTIONS})
        return plan

    def pipeline_split_points(self) -> list[int]:
        """Block indices a pipeline stage may start at: CLA producers, so no K/V crosses a stage."""
        return [i for i in range(self.config.num_layers) if not self.config.is_kv_consumer(i)]
