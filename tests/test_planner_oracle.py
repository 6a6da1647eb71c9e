"""On small clusters (up to 8 cards, a few types) the search finds what exhaustive enumeration finds."""

import pytest

from hyrun.planner import Cluster, TrainingConfig, card_spec, search
from hyrun.planner.examples import small_moe_shape, small_training, tiny_shape
from hyrun.planner.oracle import oracle_search

CPU_TESTBED = {"n0": [card_spec("cpu-sim", speed=1.0), card_spec("cpu-sim", speed=0.5)],
               "n1": [card_spec("cpu-sim", speed=1.0), card_spec("cpu-sim", speed=0.25)]}

CASES = [
    pytest.param({"a": ["H100-SXM"] * 2, "b": ["A100-80GB"] * 2}, small_training(), id="2 H100 + 2 A100"),
    pytest.param({"a": ["A100-40GB"] * 4, "b": ["H100-SXM"] * 2}, small_training(), id="4 A100-40 + 2 H100"),
    pytest.param({"a": ["V100-32GB"], "b": ["A100-40GB"] * 2, "c": ["H100-SXM"]}, small_training(), id="3 types"),
    pytest.param({"a": ["H20"] * 2, "b": ["L40S"] * 2, "c": ["H100-SXM"] * 2}, small_training(),
                 id="H20 L40S H100: stage order matters"),
    pytest.param({"a": ["H100-SXM"] * 4, "b": ["L40S"] * 4}, small_training(), id="8 cards"),
    pytest.param({"a": ["H100-SXM"] * 2, "b": ["A100-80GB"] * 2},
                 TrainingConfig(micro_batch_size=2, global_batch_sequences=64, recompute=True), id="recompute"),
]


@pytest.mark.parametrize("nodes, training", CASES)
def test_search_equals_exhaustive_oracle(nodes, training):
    cluster = Cluster.from_nodes(nodes)
    found = search(cluster, small_moe_shape(), training).best
    best = oracle_search(cluster, small_moe_shape(), training)
    assert found.step_time_s == pytest.approx(best.step_time_s, rel=1e-9)


def test_search_equals_oracle_on_the_cpu_testbed():
    cluster = Cluster.from_nodes(CPU_TESTBED)
    training = TrainingConfig(micro_batch_size=2, global_batch_sequences=32)
    found = search(cluster, tiny_shape(), training).best
    assert found.step_time_s == pytest.approx(oracle_search(cluster, tiny_shape(), training).step_time_s, rel=1e-9)


def test_oracle_is_never_worse_than_search_on_a_single_card():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"]})
    best = oracle_search(cluster, small_moe_shape(), small_training())
    assert best.degrees.world_size == 1
    assert best.step_time_s == pytest.approx(search(cluster, small_moe_shape(), small_training()).best.step_time_s)
