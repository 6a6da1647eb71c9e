"""AdamW that can give each routed expert its own learning rate although all experts of a layer
share one stacked tensor.

A param group may carry `expert_lr_scale`, a [num_experts] tensor: expert e (row e of dim 0 of every
parameter in the group) then steps with lr × scale[e], both for the Adam update and for the decoupled
weight decay. That is exactly AdamW run on each expert separately with its own LR. (Scaling gradients
instead would not do: Adam divides the gradient's scale back out.)
"""

from __future__ import annotations

import torch


class ExpertAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update rule (decoupled weight decay, bias correction), plus per-expert LR.

    State keys match torch.optim.AdamW (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints look alike.
    Under expert parallelism a rank holds a slice of the experts: set the group's `expert_lr_scale`
    to the matching slice.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1) -> None:
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid AdamW settings lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}: need lr>=0, eps>0, 0<=beta<1, weight_decay>=0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      expert_lr_scale=None))

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
                lr = self._lr_for(param, group["lr"], scale)
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                param.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(param.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                bias_correction1 = 1 - beta1 ** step
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                param.sub_(lr / bias_correction1 * exp_avg / denom)
        return loss

    @staticmethod
    def _lr_for(param: torch.Tensor, lr: float, scale: torch.Tensor | None):
        """A float, or for expert groups a tensor broadcasting lr × scale[e] along dim 0."""
        if scale is None:
            return lr
        if scale.shape != (param.shape[0],):
            raise ValueError(f"expert_lr_scale has shape {tuple(scale.shape)} but the parameter holds "
                             f"{param.shape[0]} experts on dim 0; give one scale per local expert")
        return (lr * scale.to(param.device, param.dtype)).view(-1, *([1] * (param.dim() - 1)))
