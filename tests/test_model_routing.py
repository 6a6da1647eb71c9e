"""Recycle routing and the load-balancing loss, on hand-built router choices."""

import torch

from hyrun.runtime.model.routing import capacity_per_expert, load_balancing_loss, recycle_route

torch.set_num_threads(1)


def skewed_choices(num_tokens: int, top_k: int, num_experts: int, seed: int = 0):
    """Most tokens pick experts 0 and 1, so those overflow."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(num_tokens, num_experts, generator=g)
    probs[:, :2] += 2.0
    probs = probs.softmax(-1)
    weight, choice = probs.topk(top_k, dim=-1)
    return choice, weight


def route(choice, weight, num_experts, capacity_factor, seed=0):
    tokens, k = choice.shape
    capacity = capacity_per_expert(capacity_factor, tokens, k, num_experts)
    return recycle_route(choice, weight, num_experts, capacity, torch.Generator().manual_seed(seed))


def test_no_drop_and_no_expert_over_capacity_when_capacity_suffices():
    for k in (1, 2, 3):
        choice, weight = skewed_choices(200, k, 8)
        dispatch, stats = route(choice, weight, 8, capacity_factor=1.0)
        assert stats.overflow_count > 0  # the skew really overflows experts 0 and 1
        assert stats.dropped_count == 0 and stats.recycled_count == stats.overflow_count
        assert (dispatch.expert_index < 8).all()
        assert int(stats.tokens_per_expert.sum()) == 200 * k
        assert (stats.tokens_per_expert <= stats.capacity).all()
        # Every token keeps all its k assignments.
        assert torch.equal(torch.bincount(dispatch.token_index, minlength=200), torch.full((200,), k))


def test_recycled_only_to_experts_with_room():
    choice, weight = skewed_choices(300, 1, 6)
    dispatch, stats = route(choice, weight, 6, capacity_factor=1.25)
    first_pass = stats.routed_per_expert.clamp(max=stats.capacity)
    room = stats.capacity - first_pass
    recycled_to = torch.bincount(dispatch.expert_index[dispatch.recycled], minlength=6)
    assert (recycled_to <= room).all()
    assert (recycled_to[room == 0] == 0).all()  # never to an expert that was full
    assert int(recycled_to.sum()) == int(stats.recycled_count) > 0
    # Kept assignments are exactly the router's choices; recycled ones keep their gate weight.
    kept = ~dispatch.recycled
    assert torch.equal(dispatch.expert_index[kept], choice.t().reshape(-1)[kept])
    assert torch.equal(dispatch.weight, weight.t().reshape(-1))


def test_drops_only_what_does_not_fit():
    choice, weight = skewed_choices(100, 1, 4)
    dispatch, stats = route(choice, weight, 4, capacity_factor=0.5)
    assert int(stats.dropped_count) == 100 - 4 * stats.capacity
    assert (stats.tokens_per_expert == stats.capacity).all()
    dropped = dispatch.expert_index == 4
    assert (dispatch.weight[dropped] == 0).all()


def test_same_seed_same_assignment_other_seed_differs():
    choice, weight = skewed_choices(400, 2, 8)
    a, _ = route(choice, weight, 8, 1.0, seed=7)
    b, _ = route(choice, weight, 8, 1.0, seed=7)
    c, _ = route(choice, weight, 8, 1.0, seed=8)
    assert torch.equal(a.expert_index, b.expert_index)
    assert not torch.equal(a.expert_index, c.expert_index)


def test_no_overflow_means_routing_unchanged():
    choice = torch.arange(16).remainder(4).unsqueeze(1)
    weight = torch.ones(16, 1)
    dispatch, stats = route(choice, weight, 4, capacity_factor=1.0)
    assert stats.overflow_count == 0 and not dispatch.recycled.any()
    assert torch.equal(dispatch.expert_index, choice.squeeze(1))


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_skew():
    uniform_probs = torch.full((8, 4), 0.25)
    uniform_choice = torch.arange(8).remainder(4).unsqueeze(1)
    assert torch.isclose(load_balancing_loss(uniform_probs, uniform_choice, 4), torch.tensor(1.0))
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    skewed_choice = torch.zeros(8, 1, dtype=torch.long)
    assert load_balancing_loss(skewed_probs, skewed_choice, 4) > 2.0
