"""Pure checks of the parallel layer's validation: degrees, pipeline splits, micro-batch counts."""

from __future__ import annotations

import pytest

from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.transformer import MoETransformer
from hyrun.runtime.parallel.dims import ParallelDims
from hyrun.runtime.parallel.expert_parallel import contiguous_placement
from hyrun.runtime.parallel.parallelize import _check_micro_batches
from hyrun.runtime.parallel.pipeline import stage_layers
from hyrun.runtime.parallel.stage import chunk_positions, shard_sequence


@pytest.mark.timeout(5)
def test_degrees_must_multiply_to_world_size():
    with pytest.raises(ValueError, match=r"pp=2 x dp=2 x cp=1 x tp=2 = 8 ranks, but world_size=4"):
        ParallelDims(dp=2, tp=2, pp=2, cp=1, ep=1, world_size=4)


@pytest.mark.timeout(5)
def test_ep_is_borrowed_from_dp_times_cp():
    with pytest.raises(ValueError, match=r"ep=3 must divide dp\*cp=4\*1=4"):
        ParallelDims(dp=4, tp=1, pp=1, cp=1, ep=3, world_size=4)
    dims = ParallelDims(dp=2, tp=1, pp=1, cp=2, ep=2, world_size=4)
    assert dims.ep_enabled and dims.cp_enabled and not dims.tp_enabled
    assert dims.edp == 2 and dims.gradient_divide_factor == 4
    # ep rank = (d·cp + c) mod ep, the planner's order.
    assert [dims.ep_rank(r) for r in range(4)] == [0, 1, 0, 1]


@pytest.mark.timeout(5)
def test_rejects_non_positive_and_bool_degrees():
    with pytest.raises(ValueError, match="tp=0"):
        ParallelDims(dp=1, tp=0, pp=1, cp=1, ep=1, world_size=1)
    with pytest.raises(ValueError, match="dp=True"):
        ParallelDims(dp=True, tp=1, pp=1, cp=1, ep=1, world_size=1)


@pytest.mark.timeout(5)
def test_from_planner_degrees():
    from hyrun.planner.plan import Degrees

    dims = ParallelDims.from_degrees(Degrees(pp=2, dp=2, cp=1, tp=2, ep=2))
    assert (dims.pp, dims.dp, dims.cp, dims.tp, dims.ep, dims.world_size) == (2, 2, 1, 2, 2, 8)


@pytest.mark.timeout(5)
def test_stage_split_must_start_at_kv_producers():
    model = MoETransformer(ModelConfig.from_preset("tiny"))  # cla_share_every=2: producers 0, 2
    points = model.pipeline_split_points()
    assert stage_layers([2, 2], points, 4) == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="cannot start at layer 3"):
        stage_layers([3, 1], points, 4)
    with pytest.raises(ValueError, match="sums to 5"):
        stage_layers([3, 2], points, 4)


@pytest.mark.timeout(5)
def test_expert_group_replicas_run_in_lockstep():
    dims = ParallelDims(dp=4, tp=1, pp=1, cp=1, ep=2, world_size=4)
    assert _check_micro_batches(dims, [3, 3, 1, 1]) == (3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"replicas 0..1 share an expert group .* got \(3, 1\)"):
        _check_micro_batches(dims, [3, 1, 1, 1])


@pytest.mark.timeout(5)
def test_context_parallel_chunks_balance_causal_work():
    assert chunk_positions(8, 0, 2, "cpu").tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 1, 2, "cpu").tolist() == [2, 3, 4, 5]
    import torch

    tokens = torch.arange(16).view(2, 8)
    assert shard_sequence(tokens, 1, 2).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    with pytest.raises(ValueError, match="divisible by 2\\*cp=4"):
        shard_sequence(torch.zeros(1, 6), 0, 2)
    assert contiguous_placement(8, 4) == (0, 0, 1, 1, 2, 2, 3, 3)
