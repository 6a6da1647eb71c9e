"""The training loss: next-token cross-entropy plus the MoE load-balancing loss times its coefficient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transformer import ModelOutput


def lm_loss(output: ModelOutput, targets: torch.Tensor, *, aux_loss_coeff: float | None = None,
            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, ce): total = ce + coeff × aux_loss; coeff defaults to the model config's.

    targets: [batch, seq] token ids aligned with the logits (already shifted by the caller);
    positions equal to `ignore_index` do not count.
    """
    logits = output.logits
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must match logits' batch and sequence "
                         f"dims {tuple(logits.shape[:-1])}")
    # fp32 cross-entropy: a bf16 log-softmax over 128K classes is visibly off.
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=ignore_index)
    coeff = output.aux_loss_coeff if aux_loss_coeff is None else aux_loss_coeff
    return ce + coeff * output.aux_loss, ce
