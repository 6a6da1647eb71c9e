"""`hyrun plan` output: a readable comparison table and JSON that round-trips through json."""

import json

from hyrun.planner import DATA_PARALLEL_ONLY, Cluster, format_comparison, result_to_json, search
from hyrun.planner.examples import large_cluster, small_moe_shape, small_training
from hyrun.planner.report import PER_CARD_ROWS_LIMIT


def test_comparison_table_shows_both_plans_speedup_and_every_card():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 4, "b": ["A100-80GB"] * 4})
    text = format_comparison(search(cluster, small_moe_shape(), small_training()))
    for expected in ("searched", "naive (uniform)", "degrees", "layers per stage", "micro-batches per replica",
                     "predicted step time", "peak memory per card", "straggler_wait_s",
                     "predicted speedup vs naive", "runner-ups", "A100-80GB", "H100-SXM"):
        assert expected in text
    card_rows = [line for line in text.splitlines()[text.splitlines().index("cards in the searched plan:") + 2:]]
    assert len(card_rows) == 8


def test_large_clusters_group_cards_by_role():
    cluster = large_cluster(PER_CARD_ROWS_LIMIT + 8, types=("H100-SXM", "A100-80GB"))
    result = search(cluster, small_moe_shape(), small_training(1024), constraints=DATA_PARALLEL_ONLY)
    text = format_comparison(result)
    assert len(text.splitlines()) < 40
    assert "H100-SXM" in text and "A100-80GB" in text


def test_json_output_is_plain_json():
    cluster = Cluster.from_nodes({"a": ["H100-SXM"] * 2, "b": ["L40S"] * 2})
    result = search(cluster, small_moe_shape(), small_training())
    data = json.loads(json.dumps(result_to_json(result)))
    assert data["best"]["degrees"] == {k: getattr(result.best.degrees, k) for k in ("pp", "dp", "cp", "tp", "ep")}
    assert data["best"]["rank_to_card"] == list(result.best.rank_to_card)
    assert data["speedup_vs_naive"] == result.speedup_vs_naive
    assert len(data["best"]["ranks"]) == result.best.degrees.world_size
    assert {"card", "layers", "micro_batches", "memory", "ep_rank"} <= set(data["best"]["ranks"][0])
    assert len(data["cluster"]["cards"]) == 4
