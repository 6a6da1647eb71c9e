"""Expert-specific learning rates, the per-expert AdamW that applies them, and the LR schedule."""

import math

import pytest
import torch

from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.expert_lr import ExpertLRConfig, ExpertLRController, build_param_groups, effective_expert_lrs
from hyrun.runtime.model.optimizer import ExpertAdamW
from hyrun.runtime.model.routing import RouterStats
from hyrun.runtime.model.schedule import LRSchedule, lr_at
from hyrun.runtime.model.transformer import MoETransformer

torch.set_num_threads(1)


def hand_built_stats(tokens_per_expert: list[int], num_tokens: int, top_k: int = 1) -> RouterStats:
    counts = torch.tensor(tokens_per_expert)
    zero = torch.tensor(0)
    return RouterStats(tokens_per_expert=counts, routed_per_expert=counts, overflow_count=zero,
                       recycled_count=zero, dropped_count=zero, num_tokens=num_tokens, top_k=top_k,
                       capacity=num_tokens)


def tiny_groups(rule: str = "sqrt", interval: int = 10):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", num_experts=4, top_k=1)
    model = MoETransformer(config)
    expert_lr = ExpertLRConfig(rule=rule, update_interval_steps=interval)
    optimizer = ExpertAdamW(build_param_groups(model, base_lr=1e-3, weight_decay=0.1, expert_lr=expert_lr))
    return model, optimizer, ExpertLRController(optimizer, expert_lr)


def test_groups_cover_every_parameter_once():
    model, optimizer, _ = tiny_groups()
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    expert_groups = [g for g in optimizer.param_groups if "expert_layer" in g]
    assert [g["expert_layer"] for g in expert_groups] == [0, 1, 2, 3]
    # Before any statistics: the uniform share k/N = 1/4 → sqrt → 0.5.
    assert torch.allclose(effective_expert_lrs(expert_groups[0]), torch.full((4,), 0.5e-3))


@pytest.mark.parametrize("rule,expected", [
    ("sqrt", [math.sqrt(0.5), math.sqrt(0.25), math.sqrt(0.25), 0.0]),
    ("linear", [0.5, 0.25, 0.25, 0.0]),
    ("none", [1.0, 1.0, 1.0, 1.0]),
])
def test_expert_lrs_follow_token_shares(rule, expected):
    _, optimizer, controller = tiny_groups(rule=rule, interval=10)
    # Two steps of 64 tokens: expert 0 saw half, 1 and 2 a quarter each, 3 none.
    stats = [hand_built_stats([32, 16, 16, 0], num_tokens=64)] * 4
    controller.observe(stats)
    controller.observe(stats)
    assert not controller.maybe_update(step=5)  # not on the interval
    assert controller.maybe_update(step=10)
    for group in optimizer.param_groups:
        if "expert_layer" in group:
            lrs = effective_expert_lrs(group)
            torch.testing.assert_close(lrs, 1e-3 * torch.tensor(expected), rtol=1e-6, atol=0)
    assert not controller.maybe_update(step=20)  # nothing observed since


def test_controller_reduces_counts_across_ranks():
    """Scales come from the reduced counts, so every data-parallel replica steps alike."""
    _, optimizer, _ = tiny_groups()
    other_rank = torch.tensor([0.0, 0.0, 8.0, 8.0, 16.0])  # its tokens per expert, then its token count
    controller = ExpertLRController(optimizer, ExpertLRConfig(update_interval_steps=1),
                                    reduce_counts=lambda counts: counts + other_rank.to(counts.dtype))
    controller.observe([hand_built_stats([8, 8, 0, 0], num_tokens=16)] * 4)
    controller.maybe_update(step=1)
    group = next(g for g in optimizer.param_groups if g.get("expert_layer") == 0)
    torch.testing.assert_close(group["expert_lr_scale"], torch.full((4,), 0.5))  # sqrt(8 / 32)


def test_expert_adamw_equals_adamw_per_expert():
    """Stacked experts with per-expert LR == each expert stepped by torch AdamW with its own LR."""
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 4, 5))
    scales = torch.tensor([1.0, 0.25, 0.0])
    ours = ExpertAdamW([dict(params=[stacked], expert_lr_scale=scales)], lr=1e-2, weight_decay=0.1)
    separate = [torch.nn.Parameter(stacked.detach()[e].clone()) for e in range(3)]
    theirs = [torch.optim.AdamW([p], lr=1e-2 * float(s), betas=(0.9, 0.95), weight_decay=0.1)
              for p, s in zip(separate, scales)]
    for step in range(5):
        grad = torch.randn(3, 4, 5)
        stacked.grad = grad.clone()
        ours.step()
        for e, (p, opt) in enumerate(zip(separate, theirs)):
            p.grad = grad[e].clone()
            opt.step()
    for e in range(3):
        torch.testing.assert_close(stacked.detach()[e], separate[e].detach(), rtol=1e-6, atol=1e-7)


def test_expert_adamw_rejects_a_scale_of_the_wrong_length():
    stacked = torch.nn.Parameter(torch.randn(3, 2))
    stacked.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="one scale per expert"):
        ExpertAdamW([dict(params=[stacked], expert_lr_scale=torch.ones(4))]).step()


def test_expert_adamw_on_a_slice_of_the_experts_equals_the_whole():
    """Expert parallelism: a rank holding experts 1 and 3 of 4 steps them as the whole tensor would."""
    torch.manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(4, 3))
    part = torch.nn.Parameter(whole.detach()[[1, 3]].clone())
    scales = torch.tensor([1.0, 0.5, 0.25, 0.125])
    full = ExpertAdamW([dict(params=[whole], expert_lr_scale=scales)], lr=1e-2, weight_decay=0.1)
    sliced = ExpertAdamW([dict(params=[part], expert_lr_scale=scales)], lr=1e-2, weight_decay=0.1,
                         expert_rows={part: (1, 3)})
    for _ in range(3):
        grad = torch.randn(4, 3)
        whole.grad, part.grad = grad, grad[[1, 3]].clone()
        full.step()
        sliced.step()
    torch.testing.assert_close(part.detach(), whole.detach()[[1, 3]], rtol=1e-6, atol=1e-7)


def test_schedule_warmup_decay_and_final_anneal():
    schedule = LRSchedule(peak_lr=1.0, total_steps=1000, warmup_steps=100)
    assert lr_at(0, schedule) == pytest.approx(0.01)
    assert lr_at(99, schedule) == pytest.approx(1.0)
    assert schedule.anneal_start_step == 950  # the last 5%
    lrs = [lr_at(s, schedule) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warmup
    assert lr_at(949, schedule) == pytest.approx(schedule.decay_end_ratio, abs=1e-4)
    assert lr_at(999, schedule) == pytest.approx(0.1)  # 1/10 of peak at the end
    assert lr_at(5000, schedule) == pytest.approx(0.1)
    linear = LRSchedule(peak_lr=2.0, total_steps=200, decay="linear", decay_end_ratio=0.5)
    assert lr_at(95, linear) == pytest.approx(2.0 - 1.0 * 95 / 190)


def test_schedule_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(peak_lr=1.0, total_steps=100, warmup_steps=99)
    with pytest.raises(ValueError, match="decay"):
        LRSchedule(peak_lr=1.0, total_steps=100, decay="step")
