"""Expert-specific learning rates (Hunyuan-Large): a routed expert sees only a share of the tokens
the shared expert sees, i.e. a smaller effective batch, so by Adam's batch-size scaling rule its LR is
the base LR × sqrt(share). Shares are measured from router statistics and refreshed every
`update_interval_steps`; `ExpertAdamW` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .routing import RouterStats
from .transformer import MoETransformer

LR_RULES = ("sqrt", "linear", "none")


@dataclass(frozen=True)
class ExpertLRConfig:
    rule: str = "sqrt"  # "sqrt" (Adam batch-size rule), "linear", or "none" (every expert at base LR)
    update_interval_steps: int = 100
    min_lr_scale: float = 0.0  # floor, so an expert that saw no tokens for a while is not frozen

    def __post_init__(self) -> None:
        if self.rule not in LR_RULES:
            raise ValueError(f"expert LR rule {self.rule!r} unknown; choose one of {', '.join(LR_RULES)}")
        if self.update_interval_steps < 1:
            raise ValueError(f"update_interval_steps={self.update_interval_steps} must be >= 1")
        if not 0.0 <= self.min_lr_scale <= 1.0:
            raise ValueError(f"min_lr_scale={self.min_lr_scale} must lie in [0, 1]")


def lr_scale_from_share(token_share: torch.Tensor, config: ExpertLRConfig) -> torch.Tensor:
    """LR multiplier per expert from its token share relative to the shared expert (1.0 = all tokens)."""
    share = token_share.double().clamp(min=0.0)
    if config.rule == "sqrt":
        scale = share.sqrt()
    elif config.rule == "linear":
        scale = share
    else:
        scale = torch.ones_like(share)
    return scale.clamp(min=config.min_lr_scale).float()


def token_share(tokens_per_expert: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Each expert's tokens over the shared expert's (which sees every one of `num_tokens`)."""
    return tokens_per_expert.double() / max(num_tokens, 1)


def build_param_groups(model: MoETransformer, *, base_lr: float, weight_decay: float,
                       expert_lr: ExpertLRConfig | None = None) -> list[dict]:
    """Param groups for `ExpertAdamW`: dense weights (decayed), 1-D params (norms: no decay), and
    one group per layer's routed experts carrying `expert_lr_scale`, started at the uniform share
    k / N and refreshed by `ExpertLRController`."""
    expert_lr = expert_lr or ExpertLRConfig()
    expert_params = {id(p) for experts in model.experts() for p in experts.parameters()}
    decay, no_decay = [], []
    for param in model.parameters():
        if id(param) in expert_params:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        dict(params=decay, lr=base_lr, weight_decay=weight_decay, name="dense"),
        dict(params=no_decay, lr=base_lr, weight_decay=0.0, name="norms"),
    ]
    config = model.config
    for layer, experts in zip(model.layer_indices(), model.experts()):
        # Scales are per global expert id, also where a rank holds some experts (see expert_rows).
        num_experts = getattr(experts, "num_global_experts", experts.num_experts)
        uniform = torch.full((num_experts,), config.top_k_in_layer(layer) / num_experts)
        groups.append(dict(params=list(experts.parameters()), lr=base_lr, weight_decay=weight_decay,
                           expert_lr_scale=lr_scale_from_share(uniform, expert_lr),
                           expert_layer=layer, name=f"blocks.{layer}.moe.experts"))
    return groups


def expert_rows(model: nn.Module) -> dict[nn.Parameter, tuple[int, ...]]:
    """The global expert id of each dim-0 row of every routed-expert parameter that holds only
    some of its layer's experts (expert parallelism marks such modules with `local_experts`)."""
    return {param: tuple(module.local_experts) for module in model.modules()
            if getattr(module, "local_experts", None) is not None for param in module.parameters(recurse=False)}


def effective_expert_lrs(group: dict) -> torch.Tensor:
    """The LR each expert of an expert group steps with now: lr × expert_lr_scale."""
    return group["lr"] * group["expert_lr_scale"]


class ExpertLRController:
    """Accumulates router statistics and rewrites the expert groups' scales on an interval.

    Data-parallel ranks see different tokens: pass `reduce_counts` (e.g. an all-reduce sum over the
    data-parallel group) so every replica computes the same scales, or the replicas drift apart.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ExpertLRConfig,
                 reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.optimizer = optimizer
        self.config = config
        self.reduce_counts = reduce_counts
        self._groups = {g["expert_layer"]: g for g in optimizer.param_groups if "expert_layer" in g}
        self._tokens_per_expert: dict[int, torch.Tensor] = {}
        self._num_tokens: dict[int, int] = {}

    def observe(self, router_stats: Sequence[RouterStats], layers: Sequence[int] | None = None) -> None:
        """Add one forward's statistics (ModelOutput.router_stats). Entry i is layer `layers[i]`
        (default i: the whole model; a pipeline stage passes its own layer indices)."""
        for layer, stats in zip(layers if layers is not None else range(len(router_stats)), router_stats):
            counts = stats.tokens_per_expert.detach()
            if counts.is_meta:
                continue  # a pipeline schedule's shape inference, not training
            if layer not in self._groups:
                continue
            previous = self._tokens_per_expert.get(layer)
            self._tokens_per_expert[layer] = counts.clone() if previous is None else previous + counts
            self._num_tokens[layer] = self._num_tokens.get(layer, 0) + stats.num_tokens

    def maybe_update(self, step: int) -> bool:
        """At every `update_interval_steps`-th step, refresh the scales from what was observed."""
        if step % self.config.update_interval_steps != 0 or not self._tokens_per_expert:
            return False
        for layer, counts in self._tokens_per_expert.items():
            num_tokens = torch.tensor([float(self._num_tokens[layer])], device=counts.device)
            both = torch.cat([counts.double(), num_tokens.double()])
            if self.reduce_counts is not None:
                both = self.reduce_counts(both)
            share = token_share(both[:-1], int(both[-1].item()))
            group = self._groups[layer]
            group["expert_lr_scale"] = lr_scale_from_share(share.cpu(), self.config)
        self._tokens_per_expert.clear()
        self._num_tokens.clear()
        return True

    def state_dict(self) -> dict:
        """JSON-friendly state: every layer's scales, and the counts observed since the last update
        summed over ranks (a collective when `reduce_counts` is set: call it on every rank)."""
        pending = {}
        for layer, counts in self._tokens_per_expert.items():
            both = torch.cat([counts.double(), torch.tensor([float(self._num_tokens[layer])], device=counts.device)])
            if self.reduce_counts is not None:
                both = self.reduce_counts(both.clone())
            pending[str(layer)] = both.cpu().tolist()
        scales = {
            str(layer): group["expert_lr_scale"].tolist()
            for layer, group in self._groups.items()
            if group.get("expert_lr_scale") is not None
        }
        return {"scales": scales, "pending": pending}

    def load_state_dict(self, state: dict, *, holds_pending: bool = True) -> None:
        """Restores scales everywhere; the pending (already summed) counts go to one rank only
        (`holds_pending`), so the next all-reduce adds them exactly once."""
        # A pipeline stage holds some layers only: the others' state is its peers' to restore.
        for layer, scale in state.get("scales", {}).items():
            if int(layer) in self._groups:
                self._groups[int(layer)]["expert_lr_scale"] = torch.tensor(scale, dtype=torch.float32)
        self._tokens_per_expert.clear()
        self._num_tokens.clear()
        if holds_pending:
            for layer, both in state.get("pending", {}).items():
                if int(layer) not in self._groups:
                    continue
                self._tokens_per_expert[int(layer)] = torch.tensor(both[:-1], dtype=torch.float64)
                self._num_tokens[int(layer)] = int(both[-1])
