"""The search: splits follow speed, infeasible layouts are refused with a clear message, replan avoids
excluded cards, plans are deterministic and self-consistent."""

import dataclasses
import random

import numpy as np
import pytest

from hyrun.planner import (DATA_PARALLEL_ONLY, Cluster, DegreeConstraints, TrainingConfig, card_spec, naive_plan,
                           replan, search)
from hyrun.planner.cost import usable_memory_bytes
from hyrun.planner.evaluate import evaluate, evaluate_batch, grid_context, model_tables
from hyrun.planner.examples import hunyuan_large_shape, small_moe_shape, small_training, tiny_shape
from hyrun.planner.layout import BlockTable, block_selections, candidate_grids, form_blocks
from hyrun.planner.plan import Degrees


def cpu_cluster(speeds_by_node):
    return Cluster.from_nodes({node: [card_spec("cpu-sim", speed=s) for s in speeds]
                               for node, speeds in speeds_by_node.items()})


def by_card(plan, values_by_rank):
    return {card: values_by_rank[rank] for rank, card in enumerate(plan.rank_to_card)}


def test_data_parallel_cpu_testbed_gets_micro_batches_in_proportion_to_speed():
    cluster = cpu_cluster({"n0": [1.0, 0.5], "n1": [1.0, 0.5]})
    training = TrainingConfig(micro_batch_size=1, global_batch_sequences=30)
    plan = search(cluster, tiny_shape(), training, constraints=DATA_PARALLEL_ONLY).best
    assert plan.degrees == Degrees(dp=4)
    # DP only: rank r is replica r, so these two tuples are all the runtime needs
    assert sorted(plan.rank_to_card) == [0, 1, 2, 3]
    micro_batches = dict(zip(plan.rank_to_card, plan.micro_batches_per_replica))
    assert micro_batches == {0: 10, 1: 5, 2: 10, 3: 5}
    assert sum(plan.tokens_share_per_replica) == pytest.approx(1.0)


def test_layers_follow_stage_speed():
    shape = dataclasses.replace(tiny_shape(), num_layers=16, top_k=1, cla_share_every=1, vocab_size=8)
    cluster = cpu_cluster({"n0": [1.0, 1 / 3]})
    training = TrainingConfig(micro_batch_size=1, global_batch_sequences=64)
    plan = search(cluster, shape, training, constraints=DegreeConstraints(pp=2, dp=1, cp=1, tp=1)).best
    layers = by_card(plan, [plan.layers_per_stage[plan.degrees.coordinate(r)[0]] for r in range(2)])
    assert layers == {0: 12, 1: 4}


def test_search_beats_naive_on_a_mixed_cluster_and_matches_it_on_a_uniform_one():
    mixed = Cluster.from_nodes({"a": ["H100-SXM"] * 4, "b": ["A100-80GB"] * 4})
    uniform = Cluster.from_nodes({"a": ["H100-SXM"] * 4, "b": ["H100-SXM"] * 4})
    assert search(mixed, small_moe_shape(), small_training()).speedup_vs_naive > 1.5
    assert search(uniform, small_moe_shape(), small_training()).speedup_vs_naive >= 1 - 1e-9


def test_no_layout_fits_says_what_is_short():
    cluster = Cluster.from_nodes({"a": ["L40S"] * 8})
    with pytest.raises(ValueError, match=r"needs \d+\.\d GiB per card.*largest card has 48\.0 GiB.*recompute=True"):
        search(cluster, hunyuan_large_shape(), TrainingConfig(micro_batch_size=1, global_batch_sequences=64))


def test_impossible_constraints_say_so():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 4})
    with pytest.raises(ValueError, match="no layout is possible with tp=3"):
        search(cluster, small_moe_shape(), small_training(), constraints=DegreeConstraints(tp=3))
    assert DegreeConstraints.fixed(dp=0, tp=2, pp=None) == DegreeConstraints(tp=2)


def test_infeasible_layouts_are_never_returned():
    # A 40 GiB card cannot hold what an 80 GiB one can: every returned plan fits every card it uses.
    cluster = Cluster.from_nodes({"a": ["A100-40GB"] * 2, "b": ["H100-SXM"] * 2})
    shape = small_moe_shape(num_layers=24)
    result = search(cluster, shape, TrainingConfig(micro_batch_size=4, global_batch_sequences=64), top_n=5)
    for plan in [result.best, *result.runner_ups] + ([result.naive] if result.naive else []):
        for memory in plan.memory_per_rank:
            assert memory.total_bytes <= usable_memory_bytes(memory.capacity_bytes)


def test_replan_never_uses_an_excluded_card():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 4, "b": ["A100-80GB"] * 4, "c": ["L40S"] * 4})
    rng = random.Random(3)
    for _ in range(4):
        excluded = set(rng.sample(cluster.card_ids, rng.randint(1, 5)))
        plan = replan(cluster, small_moe_shape(), small_training(), excluded)
        assert not excluded & set(plan.rank_to_card)
        assert not excluded & set(plan.unused_cards)
        assert set(plan.rank_to_card) | set(plan.unused_cards) == set(cluster.card_ids) - excluded


def test_search_is_deterministic():
    cluster = Cluster.from_nodes({"a": ["H20"] * 2, "b": ["L40S"] * 2, "c": ["H100-SXM"] * 2})
    first = search(cluster, small_moe_shape(), small_training())
    second = search(cluster, small_moe_shape(), small_training())
    assert first.best.to_dict() == second.best.to_dict()
    assert [p.to_dict() for p in first.runner_ups] == [p.to_dict() for p in second.runner_ups]


@pytest.mark.parametrize("nodes", [
    {"a": ["H100-SXM"] * 4, "b": ["A100-80GB"] * 4},
    {"a": ["H20"] * 2, "b": ["L40S"] * 2, "c": ["H100-SXM"] * 2},
    {"a": ["V100-32GB"], "b": ["A100-40GB"] * 2, "c": ["H100-SXM"]},
])
def test_plans_are_self_consistent(nodes):
    cluster = Cluster.from_nodes(nodes)
    shape, training = small_moe_shape(), small_training()
    result = search(cluster, shape, training, top_n=3)
    times = [p.step_time_s for p in [result.best, *result.runner_ups]]
    assert times == sorted(times)
    assert len({p.degrees for p in [result.best, *result.runner_ups]}) == len(times)
    for plan in [result.best, *result.runner_ups, result.naive]:
        d = plan.degrees
        assert len(set(plan.rank_to_card)) == d.world_size
        assert set(plan.rank_to_card) | set(plan.unused_cards) == set(cluster.card_ids)
        assert sum(plan.layers_per_stage) == shape.num_layers
        assert sum(plan.micro_batches_per_replica) == training.micro_batches_per_step(shape.seq_len)
        assert plan.terms.total_s == pytest.approx(plan.step_time_s)
        assert all(len(owners) == shape.experts_in_layer(i) and set(owners) <= set(range(d.ep))
                   for i, owners in enumerate(plan.expert_placement))
        for coordinate, card in plan.card_by_coordinate.items():
            assert plan.rank_to_card[d.rank(*coordinate)] == card
        # a TP group (and a CP ring) is one card type on one node
        for p in range(d.pp):
            for r in range(d.dp):
                cards = [cluster.card(plan.card_by_coordinate[(p, r, c, t)])
                         for c in range(d.cp) for t in range(d.tp)]
                assert len({c.node for c in cards}) == 1 and len({c.spec.name for c in cards}) == 1


def test_constraints_fix_degrees():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 4, "b": ["H100-SXM"] * 4})
    plan = search(cluster, small_moe_shape(), small_training(), constraints=DegreeConstraints(tp=2, pp=2)).best
    assert plan.degrees.tp == 2 and plan.degrees.pp == 2


def test_experts_go_to_fast_cards_when_an_expert_group_mixes_speeds():
    cluster = cpu_cluster({"n0": [1.0, 1 / 3]})
    shape = dataclasses.replace(tiny_shape(), top_k=1)
    plan = search(cluster, shape, TrainingConfig(micro_batch_size=1, global_batch_sequences=16),
                  constraints=DegreeConstraints(pp=1, dp=2, cp=1, tp=1, ep=2)).best
    fast_rank = plan.rank_of_card(0)
    fast_ep = plan.degrees.ep_rank(*plan.degrees.coordinate(fast_rank)[1:3])
    assert len(plan.experts_of_ep_rank(0, fast_ep)) == 6  # 8 experts, 3:1 speeds
    assert len(plan.experts_of_ep_rank(0, 1 - fast_ep)) == 2


def test_naive_plan_is_uniform_in_card_order():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 2, "b": ["A100-80GB"] * 2})
    plan = naive_plan(cluster, small_moe_shape(), small_training())
    assert plan.rank_to_card == (0, 1, 2, 3) and plan.label == "naive"
    assert max(plan.layers_per_stage) - min(plan.layers_per_stage) <= 1
    assert max(plan.micro_batches_per_replica) - min(plan.micro_batches_per_replica) <= 1


def test_batched_evaluation_agrees_with_single_evaluation():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 2, "b": ["A100-40GB"] * 2, "c": ["L40S"] * 2})
    tables = model_tables(small_moe_shape(), TrainingConfig(micro_batch_size=1, global_batch_sequences=37 * 2))
    table = BlockTable.of(form_blocks(cluster, 1))
    for degrees in (Degrees(pp=2, dp=3), Degrees(pp=3, dp=2, ep=2), Degrees(pp=1, dp=6, ep=2)):
        for grid in candidate_grids(table, block_selections(table, 6)[0], degrees.pp, degrees.dp):
            ctx = grid_context(tables, degrees, table, grid)
            splits = [s for s in ([2, 6], [4, 4], [1, 7], [2, 3, 3], [6, 1, 1], [8]) if len(s) == degrees.pp]
            times, feasible = evaluate_batch(ctx, splits)
            for split, time_s, fits in zip(splits, times, feasible):
                single = evaluate(ctx, split)
                assert single.step_time_s == pytest.approx(time_s, rel=1e-9) and single.feasible == fits
                assert np.all(single.micro_batches_per_group >= 1)


def test_collective_latency_decides_between_layouts_that_talk_inside_each_layer_and_data_parallelism():
    """On the CPU testbed a collective costs milliseconds (measured by benchmarks/layouts.py), so the
    search keeps to data parallelism; with GPU-class latency the same cluster would use ep."""
    training = TrainingConfig(micro_batch_size=2, global_batch_sequences=8)
    shape = dataclasses.replace(tiny_shape(), seq_len=16)  # short sequences: expert compute dominates

    def best(latency_s: float) -> Degrees:
        spec = dataclasses.replace(card_spec("cpu-sim"), collective_latency_s=latency_s)
        return search(Cluster.from_nodes({n: [spec, spec] for n in ("n0", "n1")}), shape, training).best.degrees

    assert best(card_spec("cpu-sim").collective_latency_s) == Degrees(dp=4)
    assert best(0.0).ep > 1


def test_every_collective_pays_its_latency():
    from hyrun.planner import cost

    no_latency = cost.tp_collective_time_s(1024, 512, 2, 2, 1e9, 4, False)
    assert cost.tp_collective_time_s(1024, 512, 2, 2, 1e9, 4, False, 1e-3) == pytest.approx(
        no_latency + 4 * cost.TP_COLLECTIVES_PER_LAYER * 1e-3)
    a2a = lambda latency: cost.expert_all_to_all_time_s(1024, 2, 512, 2, 4, 1e9, False, 4, latency)  # noqa: E731
    assert a2a(1e-3) == pytest.approx(a2a(0.0) + 4 * cost.ALL_TO_ALLS_PER_MOE_LAYER * 1e-3)
    assert cost.expert_all_to_all_time_s(1024, 2, 512, 2, 1, 1e9, False, 4, 1e-3) == 0.0  # no ep, no messages
