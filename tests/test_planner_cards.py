"""Cards and clusters: the catalogue, custom types, ids that survive exclusion, blocks of one type on one
node."""

import dataclasses

import pytest

from hyrun.planner import CARD_CATALOGUE, GIB, CardSpec, Cluster, card_spec
from hyrun.planner.cluster import cluster_from_job
from hyrun.planner.layout import form_blocks, naive_blocks

REQUIRED = ("A100-40GB", "A100-80GB", "H100-SXM", "H800", "H20", "L40S", "V100-32GB", "MI300X", "Ascend-910B",
            "cpu-sim")


def test_catalogue_has_the_required_cards_with_sane_figures():
    for name in REQUIRED:
        spec = CARD_CATALOGUE[name]
        assert spec.name == name and spec.speed == 1.0
        assert spec.inter_node_bandwidth_bytes_per_s <= spec.intra_node_bandwidth_bytes_per_s
    assert CARD_CATALOGUE["H100-SXM"].peak_tflops > 3 * CARD_CATALOGUE["A100-80GB"].peak_tflops - 1
    assert CARD_CATALOGUE["H20"].memory_bytes > CARD_CATALOGUE["H100-SXM"].memory_bytes
    h800, h100 = CARD_CATALOGUE["H800"], CARD_CATALOGUE["H100-SXM"]
    assert h800.intra_node_bandwidth_bytes_per_s < h100.intra_node_bandwidth_bytes_per_s
    assert CARD_CATALOGUE["cpu-sim"].peak_tflops < 1


def test_card_spec_lookup_custom_types_and_overrides():
    custom = {"X1": CardSpec("X1", 100, 24 * GIB, 1e12, 1e11, 1e10)}
    assert card_spec("X1", custom=custom).peak_tflops == 100
    slow = card_spec("cpu-sim", speed=0.5, memory_bytes=2 * GIB)
    assert slow.speed == 0.5 and slow.memory_bytes == 2 * GIB
    with pytest.raises(ValueError, match="unknown card type 'B200'.*A100-40GB.*X1"):
        card_spec("B200", custom=custom)


def test_card_spec_rejects_nonsense():
    with pytest.raises(ValueError, match="speed=0"):
        CardSpec("bad", 1, GIB, 1, 1, 1, speed=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        CardSpec("bad", 1, -1, 1, 1, 1)


def test_cluster_ids_nodes_types_and_exclusion():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 2, "b": ["A100-80GB", "L40S"]})
    assert cluster.card_ids == (0, 1, 2, 3)
    assert cluster.node_names == ("a", "b")
    assert [c.global_id for c in cluster.cards_on_node("b")] == [2, 3]
    assert {k: len(v) for k, v in cluster.cards_by_type().items()} == {"H100-SXM": 2, "A100-80GB": 1, "L40S": 1}
    smaller = cluster.without({1, 2})
    assert smaller.card_ids == (0, 3) and smaller.card(3).spec.name == "L40S"
    with pytest.raises(ValueError, match="unknown card ids \\[9\\]"):
        cluster.without({9})
    with pytest.raises(ValueError, match="leaves no card"):
        cluster.without({0, 1, 2, 3})
    with pytest.raises(ValueError, match="no node 'c'"):
        cluster.cards_on_node("c")
    assert "2 × H100-SXM" in cluster.describe()


def test_cluster_rejects_duplicate_ids():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 2})
    with pytest.raises(ValueError, match="unique"):
        Cluster((cluster.cards[0], dataclasses.replace(cluster.cards[1], global_id=0)))


def test_blocks_are_one_type_on_one_node_and_pair_similar_speeds():
    cluster = Cluster.from_nodes({
        "a": [card_spec("A100-80GB", speed=s) for s in (1.0, 0.5, 0.9, 0.6)] + [card_spec("L40S")] * 2,
        "b": ["A100-80GB"] * 3})
    blocks = form_blocks(cluster, 2)
    for block in blocks:
        cards = [cluster.card(i) for i in block.card_ids]
        assert len({c.node for c in cards}) == 1 and len({c.spec.name for c in cards}) == 1
    a100_on_a = [b for b in blocks if b.node == "a" and b.spec_name == "A100-80GB"]
    assert [set(b.card_ids) for b in a100_on_a] == [{0, 2}, {1, 3}]  # 1.0 with 0.9, 0.6 with 0.5
    assert len([b for b in blocks if b.node == "b"]) == 1  # the third card of node b stays out
    # naive blocks follow card ids and refuse to straddle nodes
    assert naive_blocks(cluster, 4) is None  # 9 cards
    assert naive_blocks(Cluster.from_nodes({"a": ["H20"] * 3, "b": ["H20"] * 3}), 2) is None  # [2, 3] straddles
    assert len(naive_blocks(Cluster.from_nodes({"a": ["H20"] * 4}), 2)) == 2


def test_cluster_from_job_reads_plain_data_and_custom_types():
    nodes = [{"name": "n0", "cards": [{"type": "cpu-sim", "count": 2, "speed": 0.5},
                                      {"type": "X1", "count": 1, "memory_gb": 8}]},
             {"name": "n1", "cards": [{"type": "H100-SXM", "count": 1}]}]
    card_types = {"X1": {"peak_tflops": 100, "memory_gb": 24, "memory_bandwidth_gbps": 900,
                         "intra_node_bandwidth_gbps": 64, "inter_node_bandwidth_gbps": 12.5}}
    cluster = cluster_from_job(nodes, card_types)
    assert cluster.card_ids == (0, 1, 2, 3)
    assert [c.spec.name for c in cluster.cards] == ["cpu-sim", "cpu-sim", "X1", "H100-SXM"]
    assert cluster.card(0).spec.speed == 0.5
    assert cluster.card(2).spec.memory_bytes == 8 * GIB  # the group's memory_gb wins over the type's
    assert cluster.card(2).spec.intra_node_bandwidth_bytes_per_s == 64e9
    assert cluster.card(3).node == "n1"
