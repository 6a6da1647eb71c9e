"""The model as one rank runs it: a pipeline stage (embedding on the first, norm and head on the last,
any layers in between) over this rank's context-parallel chunk of the sequence.

`as_stage` re-classes a built `MoETransformer` in place, so parameter names (`blocks.3.moe...`) stay
those of the whole model: checkpoints and reference comparisons line up across plans.
"""

from __future__ import annotations

import torch
from torch import nn

from hyrun.runtime.model.attention import document_mask
from hyrun.runtime.model.transformer import MoETransformer


class StageTransformer(MoETransformer):
    """forward(tokens | hidden, aux[, segments]) → (logits | hidden, aux[, segments]): aux is the running
    sum of the layers' load-balancing losses, [1], carried between stages so its gradient reaches every
    stage. With packed documents the first stage gets tokens and segment ids stacked, [batch, 2, seq],
    and the segment ids travel on with the hidden state, so every stage masks attention alike."""

    is_first: bool
    is_last: bool
    cp_rank: int
    cp_size: int

    def forward(self, inputs: torch.Tensor, aux: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        if self.embedding is not None:
            if inputs.dim() == 3:
                inputs, segments = inputs[:, 0], inputs[:, 1].contiguous()  # sent on to the next stage
            x = self.embedding(inputs)
            aux = x.new_zeros(1)
        else:
            x = inputs
        positions = chunk_positions(x.shape[1] * self.cp_size, self.cp_rank, self.cp_size, x.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        mask = document_mask(segments) if segments is not None else None
        shared_kv, self.router_stats = None, []
        for block in self.blocks.values():
            out = block(x, cos, sin, shared_kv, mask)
            x, shared_kv = out.hidden, out.shared_kv
            aux = aux + out.aux_loss
            self.router_stats.append(out.router_stats)
        if self.lm_head is None:
            return (x, aux) if segments is None else (x, aux, segments)
        return self.lm_head(self.final_norm(x)), aux

    def layer_indices(self) -> list[int]:
        return [int(key) for key in self.blocks.keys()]

    def set_routing_step(self, step: int) -> None:
        for block in self.blocks.values():
            block.moe.router.routing_step = step

    def experts(self):
        return [block.moe.experts for block in self.blocks.values()]

    def tensor_parallel_plan(self) -> dict[str, str]:
        plan: dict[str, str] = {}
        for key, block in self.blocks.items():
            for kind, names in block.attention.projection_names().items():
                plan.update({f"blocks.{key}.attention.{n}": kind for n in names})
            shared = block.moe.shared_expert
            if shared is not None:
                plan.update({f"blocks.{key}.moe.shared_expert.{n}": "colwise" for n in shared.COLWISE_PROJECTIONS})
                plan.update({f"blocks.{key}.moe.shared_expert.{n}": "rowwise" for n in shared.ROWWISE_PROJECTIONS})
        return plan


def as_stage(model: MoETransformer, layers: range, *, is_first: bool, is_last: bool,
             cp_rank: int = 0, cp_size: int = 1) -> StageTransformer:
    """Keep only `layers` (and the embedding / head when first / last); in place, names unchanged."""
    blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
    model.blocks = blocks
    if not is_first:
        model.embedding = None
    if not is_last:
        model.final_norm = None
        model.lm_head = None
    model.__class__ = StageTransformer
    model.is_first, model.is_last, model.cp_rank, model.cp_size = is_first, is_last, cp_rank, cp_size
    model.router_stats = []
    return model


def chunk_positions(seq_len: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Positions of the tokens a context-parallel rank holds: chunks r and 2n−1−r of 2n equal chunks,
    so every rank gets as much causal-attention work as every other (the load balance)."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(tokens: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's load-balanced chunks of [batch, seq] (seq divisible by 2·cp_size)."""
    if cp_size == 1:
        return tokens
    if tokens.dim() == 3:
        raise ValueError("packed documents with their segment ids are not built for context parallelism: set "
                         "data.document_mask: false or cp: 1")
    seq = tokens.shape[1]
    if seq % (2 * cp_size):
        raise ValueError(f"sequence length {seq} must be divisible by 2*cp={2 * cp_size} for the causal "
                         "load balance of context parallelism")
    return tokens[:, chunk_positions(seq, cp_rank, cp_size, tokens.device)]
