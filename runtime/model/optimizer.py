"""AdamW that can give each routed expert its own learning rate although all experts of a layer
share one stacked tensor.

A param group may carry `expert_lr_scale`, a [num_experts] tensor: expert e (row e of dim 0 of every
parameter in the group) then steps with lr × scale[e], both for the Adam update and for the decoupled
weight decay. That is exactly AdamW run on each expert separately with its own LR. (Scaling gradients
instead would not do: Adam divides the gradient's scale back out.)

The update is elementwise, so it runs on each rank's local shard of a DTensor (FSDP, TP) as it is;
the scale rows a shard needs are found from its offset, or, for a rank holding some of the experts
(expert parallelism), from `expert_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.distributed.tensor import DTensor

from hyrun.runtime.tensors import local_part, local_rows


class ExpertAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update rule (decoupled weight decay, bias correction), plus per-expert LR.

    State keys match torch.optim.AdamW (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints look alike.
    Under expert parallelism a rank holds a slice of the experts: set the group's `expert_lr_scale`
    to the matching slice.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1,
                 expert_rows: Mapping[torch.Tensor, Sequence[int]] | None = None) -> None:
        """`expert_rows[param]`: the global expert id of each dim-0 row of a parameter that holds only
        some of its layer's experts (`hyrun.runtime.model.expert_rows(model)`)."""
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}: need lr>=0, eps>0, 0<=beta<1, weight_decay>=0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      expert_lr_scale=None))
        # By identity, and outside the param groups: a checkpoint restores groups, and rows belong
        # to this rank's layout, not to the saved one.
        self._rows = {id(param): torch.tensor(list(rows), dtype=torch.long) for param, rows in (expert_rows or {}).items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            scale = group.get("expert_lr_scale")
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"].item()
                value, grad, exp_avg, exp_avg_sq = (
                    local_part(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"]))
                lr = group["lr"] if scale is None else self._expert_lrs(param, group["lr"], scale)
                value.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                value.sub_(lr / bias_correction1 * exp_avg / denom)
        return loss

    def _expert_lrs(self, param: torch.Tensor, lr: float, scale: torch.Tensor) -> torch.Tensor:
        """lr × scale[e] for each dim-0 row of this rank's part of `param`, shaped to broadcast."""
        rows = self._rows.get(id(param))
        if rows is not None:
            scale = scale[rows]
        elif isinstance(param, DTensor):
            held = local_rows(param)  # an FSDP shard holds a block of the experts
            scale = scale[held.start:held.stop]
        local = local_part(param)
        if scale.shape != (local.shape[0],):
            raise ValueError(f"expert_lr_scale has shape {tuple(scale.shape)} but the parameter holds "
                             f"{local.shape[0]} experts on dim 0; give one scale per expert")
        return (lr * scale.to(local.device, local.dtype)).view(-1, *([1] * (local.dim() - 1)))

