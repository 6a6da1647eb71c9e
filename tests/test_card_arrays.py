"""The flat per-card arrays: batch ingest, slot ranges, liveness, and the collector's vectorized
choice of exported cards against the reference `cards_to_export`."""

from __future__ import annotations

import math

import numpy as np

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.card_metrics import CardCollector, cards_to_export, riskiest_slots
from hyrun.runtime.coordinator.card_arrays import CardArrays, CardColumns, DelayHistogram


def _columns(cards_per_node: list[list[tuple[int, float]]]) -> CardColumns:
    samples = [pb.CardTelemetry(index=i, temperature_c=t, slowdown_temperature_c=90.0) for node in cards_per_node for i, t in node]
    return CardColumns.from_samples(samples)


def test_a_batch_lands_in_each_nodes_slots():
    arrays = CardArrays(capacity_cards=4, capacity_nodes=1)  # forces both to grow
    arrays.register("a", [(0, "H100", 80), (1, "H100", 80)])
    nids = arrays.ingest(["a", "b"], [1, 1], [2, 3], _columns([[(0, 50.0), (1, 51.0)], [(0, 60.0), (1, 61.0), (2, 62.0)]]), 10.0)
    assert [arrays.node_names[i] for i in nids] == ["a", "b"]
    b = arrays.node_index["b"]
    start = arrays.slot_start[b]
    assert list(arrays.temperature_c[start : start + 3]) == [60.0, 61.0, 62.0]
    assert arrays.type_names[arrays.card_type[arrays.slot_start[arrays.node_index["a"]]]] == "H100"
    assert arrays.last_seen_s[b] == 10.0 and arrays.beats[b] == 1


def test_a_node_reporting_more_cards_moves_and_keeps_its_registration():
    arrays = CardArrays()
    arrays.register("a", [(0, "A100", 40)])
    arrays.ingest(["a"], [1], [2], _columns([[(0, 50.0), (1, 70.0)]]), 1.0)
    slots = arrays.slots_in_use()
    assert len(slots) == 2
    assert [arrays.type_names[arrays.card_type[s]] for s in slots] == ["A100", "unknown"]
    assert sorted(arrays.temperature_c[slots]) == [50.0, 70.0]


def test_gaps_in_the_sequence_count_as_missed_beats():
    arrays = CardArrays()
    for seq in (1, 2, 5):
        arrays.ingest(["a"], [seq], [1], _columns([[(0, 50.0)]]), float(seq))
    a = arrays.node_index["a"]
    assert (arrays.beats[a], arrays.missed[a]) == (3, 2)


def test_overdue_counts_from_the_lease_which_a_relays_death_moves():
    arrays = CardArrays()
    arrays.register("never-beat", [(0, "x", 1)])
    arrays.ingest(["a", "b"], [1, 1], [1, 1], _columns([[(0, 50.0)], [(0, 50.0)]]), 0.0)
    assert arrays.overdue(5.0, lease_s=4.0) == ["a", "b"]  # never-beat has no lease yet
    arrays.extend_lease(["b"], 3.0)
    assert arrays.overdue(5.0, lease_s=4.0) == ["a"]
    assert arrays.overdue(7.5, lease_s=4.0) == ["a", "b"]


def test_delay_histogram_quantiles_are_within_a_bucket():
    hist = DelayHistogram()
    hist.add(np.linspace(0.001, 0.100, 1000))
    assert math.isclose(hist.quantile(0.5), 0.0505, rel_tol=0.03)
    assert math.isclose(hist.quantile(0.99), 0.099, rel_tol=0.03)
    assert hist.total == 1000


def test_vectorized_export_choice_matches_cards_to_export():
    collector = CardCollector(limit=5)
    rng = np.random.default_rng(0)
    for n in range(6):
        collector.register_node(f"n{n}", [(i, "H100", 1) for i in range(4)])
        temps = rng.uniform(30, 89, 4)
        collector.ingest(f"n{n}", [pb.CardTelemetry(index=i, temperature_c=float(t), slowdown_temperature_c=90.0,
                                                    ecc_uncorrected=int(n == 5 and i == 0)) for i, t in enumerate(temps)])  # fmt: skip
    cols, names, types = collector._snapshot()
    every = collector._rows(cols, np.arange(len(cols["card_index"])), names, types)
    picked = collector._rows(cols, riskiest_slots(cols, 5), names, types)
    assert [(r.node, r.card) for r in picked] == [(r.node, r.card) for r in cards_to_export(every, 5)]
    assert (picked[0].node, picked[0].card) == ("n5", 0)  # the ECC card first, whatever its temperature


def test_every_reporting_card_is_in_the_utilization_histogram_by_type():
    from prometheus_client import generate_latest

    from hyrun.runtime.metrics import CoordinatorMetrics

    metrics = CoordinatorMetrics(card_series_limit=1)
    metrics.cards_health.register_node("n", [(i, "H100", 1) for i in range(4)])  # card 3 never reports
    metrics.cards_health.ingest("n", [pb.CardTelemetry(index=i, utilization=u) for i, u in enumerate((0.05, 0.5, 0.95))])
    body = generate_latest(metrics.registry).decode()
    assert 'hyrun_cards_utilization_ratio_bucket{card_type="H100",le="0.1"} 1.0' in body
    assert 'hyrun_cards_utilization_ratio_bucket{card_type="H100",le="0.5"} 2.0' in body
    assert 'hyrun_cards_utilization_ratio_bucket{card_type="H100",le="+Inf"} 3.0' in body


def test_registering_again_starts_a_fresh_lease():
    arrays = CardArrays()
    arrays.ingest(["a"], [1], [1], _columns([[(0, 50.0)]]), 0.0)
    assert arrays.overdue(10.0, lease_s=5.0) == ["a"]
    arrays.register("a", [(0, "x", 1)], now_s=9.0)  # lost, then back on a new stream
    assert arrays.overdue(10.0, lease_s=5.0) == []
