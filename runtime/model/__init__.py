"""hyrun's Hunyuan-Large-style MoE model: config and presets, the model, its loss, expert-specific
learning rates and the LR schedule. Pure PyTorch; parallelism is applied from outside."""

from .config import ModelConfig
from .expert_lr import (ExpertLRConfig, ExpertLRController, build_param_groups, effective_expert_lrs, expert_rows,
                        lr_scale_from_share, token_share)
from .experts import EXPERT_PATHS, GroupedExperts, SwiGLU, resolve_expert_path
from .loss import lm_loss
from .optimizer import ExpertAdamW
from .routing import Dispatch, Router, RouterStats, capacity_per_expert, load_balancing_loss, recycle_route
from .schedule import LRSchedule, lr_at
from .transformer import Block, BlockOutput, ModelOutput, MoETransformer

__all__ = [
    "EXPERT_PATHS", "Block", "BlockOutput", "Dispatch", "ExpertAdamW", "ExpertLRConfig",
    "ExpertLRController", "GroupedExperts", "LRSchedule", "ModelConfig", "ModelOutput",
    "MoETransformer", "Router", "RouterStats", "SwiGLU", "build_param_groups", "capacity_per_expert",
    "effective_expert_lrs", "expert_rows", "lm_loss", "load_balancing_loss", "lr_at", "lr_scale_from_share",
    "recycle_route", "resolve_expert_path", "token_share",
]
