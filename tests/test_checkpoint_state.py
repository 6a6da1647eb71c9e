"""Routed experts are saved one per key by global expert id, whichever rows a rank holds, so a
checkpoint written by one expert layout loads into another."""

from __future__ import annotations

import torch

from hyrun.runtime.checkpoint.state import live_state
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.expert_lr import build_param_groups, expert_rows
from hyrun.runtime.model.optimizer import ExpertAdamW
from hyrun.runtime.model.transformer import MoETransformer


def _model_and_optimizer(local_experts=None):
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_preset("tiny"))
    if local_experts is not None:  # what expert parallelism leaves on a rank: some rows, marked
        for experts in model.experts():
            with torch.no_grad():
                experts.w_gate_up = torch.nn.Parameter(experts.w_gate_up[list(local_experts)].clone())
                experts.w_down = torch.nn.Parameter(experts.w_down[list(local_experts)].clone())
            experts.num_global_experts, experts.local_experts = experts.num_experts, tuple(local_experts)
            experts.num_experts = len(local_experts)
    optimizer = ExpertAdamW(build_param_groups(model, base_lr=1e-3, weight_decay=0.0), expert_rows=expert_rows(model))
    return model, optimizer


def test_experts_are_keyed_by_global_id_and_share_the_live_storage():
    model, optimizer = _model_and_optimizer()
    saved = live_state(model, optimizer).saved["model"]
    name = "blocks.0.moe.experts.w_down"
    assert name not in saved
    num_experts = model.config.num_experts
    rows = [saved[f"{name}#expert{e}"] for e in range(num_experts)]
    assert all(row.shape[0] == 1 for row in rows)
    rows[3].fill_(7.0)  # a load writes into these views: it must reach the parameter
    assert bool((model.blocks[0].moe.experts.w_down[3] == 7.0).all())


def test_a_rank_holding_some_experts_saves_exactly_those_ids():
    whole, whole_optimizer = _model_and_optimizer()
    part, part_optimizer = _model_and_optimizer(local_experts=(1, 5))
    name = "blocks.2.moe.experts.w_gate_up"
    whole_saved = live_state(whole, whole_optimizer).saved["model"]
    part_saved = live_state(part, part_optimizer).saved["model"]
    assert sorted(k for k in part_saved if k.startswith(name)) == [f"{name}#expert1", f"{name}#expert5"]
    for e in (1, 5):
        torch.testing.assert_close(part_saved[f"{name}#expert{e}"], whole_saved[f"{name}#expert{e}"])
    # Optimizer state is flattened by parameter name and split the same way.
    optim = live_state(part, part_optimizer).saved["optim"]
    assert f"state.{name}.exp_avg#expert5" in optim and f"state.{name}.exp_avg" not in optim
