"""Every cost term moves the way physics says: more work or bytes take longer, more bandwidth or
speed take less, overlap hides, sharding saves memory."""

import numpy as np
import pytest

from hyrun.planner import cost

GB = 1e9


def increasing(values) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(np.all(np.diff(values) > 0))


def non_increasing(values) -> bool:
    return bool(np.all(np.diff(np.asarray(values, dtype=float)) <= 0))


def test_compute_time_grows_with_flops_and_shrinks_with_card_speed():
    assert increasing([cost.compute_time_s(f, 1e12) for f in (1e9, 1e10, 1e11)])
    assert non_increasing([cost.compute_time_s(1e12, v) for v in (1e12, 2e12, 4e12)])
    assert cost.compute_time_s(2e12, 1e12) == pytest.approx(2.0)


def test_compute_time_is_a_roofline():
    flops_bound = cost.compute_time_s(1e12, 1e12, bytes_moved=1e9, memory_bandwidth_bytes_per_s=1e12)
    memory_bound = cost.compute_time_s(1e12, 1e12, bytes_moved=1e13, memory_bandwidth_bytes_per_s=1e12)
    assert flops_bound == pytest.approx(1.0)
    assert memory_bound == pytest.approx(10.0)


def test_stage_compute_time_follows_flops_card_speed_and_expert_share():
    t = lambda flops=1e12, speed=1e12, expert=0.0, weights=0.0: float(  # noqa: E731
        cost.stage_compute_time_s(flops, speed, expert, weights, 1e12))
    assert increasing([t(flops=f) for f in (1e11, 1e12, 1e13)])
    assert non_increasing([t(speed=v) for v in (1e11, 1e12, 1e13)])
    assert t(expert=0.5) == pytest.approx(1.5)
    assert t(weights=1e13) == pytest.approx(10.0)  # bound by streaming the weights
    share = [float(cost.expert_compute_time_s(1e12, 4, s, 1e12)) for s in (1 / 8, 1 / 4, 1 / 2)]
    assert increasing(share)
    assert float(cost.expert_compute_time_s(1e12, 4, 1 / 4, 1e12)) == pytest.approx(1.0)  # even share: own tokens
    assert float(cost.expert_compute_time_s(1e12, 4, 1 / 4, 2e12)) == pytest.approx(0.5)


def test_ring_collectives_cost_bytes_over_bandwidth_and_grow_with_group_size():
    assert cost.ring_all_reduce_time_s(1e9, 1, 100 * GB) == 0
    assert increasing([cost.ring_all_reduce_time_s(1e9, n, 100 * GB) for n in (2, 4, 8, 64)])
    assert increasing([cost.ring_all_reduce_time_s(b, 8, 100 * GB) for b in (1e6, 1e8, 1e9)])
    assert non_increasing([cost.ring_all_reduce_time_s(1e9, 8, bw) for bw in (10 * GB, 100 * GB, 900 * GB)])
    # an all-reduce is a reduce-scatter plus an all-gather
    assert cost.ring_all_reduce_time_s(1e9, 8, GB) == pytest.approx(
        cost.ring_reduce_scatter_time_s(1e9, 8, GB) + cost.ring_all_gather_time_s(1e9, 8, GB))


def test_tp_collectives_grow_with_tp_tokens_layers_and_recompute():
    base = dict(tokens=4096, hidden_size=4096, activation_bytes=2, tp=4, bandwidth_bytes_per_s=300 * GB,
                num_layers=4, recompute=False)
    t = lambda **kw: float(cost.tp_collective_time_s(**{**base, **kw}))  # noqa: E731
    assert t(tp=1) == 0
    assert increasing([t(tp=n) for n in (2, 4, 8)])
    assert increasing([t(tokens=n) for n in (1024, 4096, 16384)])
    assert increasing([t(num_layers=n) for n in (1, 4, 16)])
    assert t(recompute=True) > t()
    assert t(bandwidth_bytes_per_s=600 * GB) < t()


def test_cp_ring_exchange_grows_with_cp_and_hides_behind_attention():
    t = lambda cp, tokens=2048: float(cost.cp_ring_exchange_time_s(tokens, 2048, cp, 100 * GB, 8, False))  # noqa: E731
    assert t(1) == 0
    assert increasing([t(cp) for cp in (2, 4, 8)])
    assert increasing([t(2, tokens) for tokens in (512, 2048, 8192)])
    ring = t(4)
    assert non_increasing([cost.exposed_time_s(ring, hide) for hide in (0, ring / 2, ring, 2 * ring)])
    assert cost.exposed_time_s(ring, 2 * ring) == 0


def test_expert_all_to_all_grows_with_ep_tokens_and_top_k():
    t = lambda ep, tokens=4096, k=2, bw=50 * GB: float(  # noqa: E731
        cost.expert_all_to_all_time_s(tokens, k, 4096, 2, ep, bw, False))
    assert t(1) == 0
    assert increasing([t(ep) for ep in (2, 4, 8, 16)])
    assert increasing([t(4, tokens) for tokens in (1024, 4096)])
    assert increasing([t(4, 4096, k) for k in (1, 2, 8)])
    assert t(4, bw=450 * GB) < t(4, bw=50 * GB)  # inside a node beats across nodes
    assert float(cost.expert_all_to_all_time_s(4096, 2, 4096, 2, 4, 50 * GB, True)) > t(4)


def test_pipeline_p2p_shrinks_with_tp_and_bandwidth():
    t = lambda tp, bw: float(cost.pipeline_p2p_time_s(4096, 4096, 2, tp, bw, 1))  # noqa: E731
    assert t(2, 50 * GB) < t(1, 50 * GB)
    assert t(1, 450 * GB) < t(1, 50 * GB)


def test_one_f_one_b_bubble_is_pp_minus_one_stage_times_and_amortizes_over_micro_batches():
    stages = np.full(4, 0.1)
    assert float(cost.pipeline_bubble_time_s(stages)) == pytest.approx(0.3)
    assert float(cost.pipeline_bubble_time_s(np.array([0.1]))) == 0
    times = [float(cost.one_f_one_b_time_s(m, stages)) for m in (1, 4, 16, 64)]
    assert increasing(times)
    bubble_share = [float(cost.pipeline_bubble_time_s(stages)) / t for t in times]
    assert increasing(-np.array(bubble_share))
    # the slowest stage paces the pipeline
    assert float(cost.one_f_one_b_time_s(8, np.array([0.1, 0.3, 0.1]))) == pytest.approx(8 * 0.3 + 0.2)


def test_dp_sync_grows_with_bytes_and_hides_behind_backward():
    rs, ag = cost.dp_grad_sync_time_s(4e9, 2e9, 8, 25 * GB)
    rs2, ag2 = cost.dp_grad_sync_time_s(8e9, 4e9, 8, 25 * GB)
    assert rs2 > rs and ag2 > ag
    assert cost.dp_grad_sync_time_s(4e9, 2e9, 1, 25 * GB) == (0, 0)
    exposed = [float(cost.dp_exposed_time_s(rs, ag, w, w / 2)) for w in (0.0, 0.05, 0.1, 1.0)]
    assert non_increasing(exposed)
    assert exposed[0] == pytest.approx(float(rs + ag))
    assert exposed[-1] == 0


def test_straggler_wait_is_zero_when_balanced_and_grows_with_spread():
    assert cost.straggler_wait_time_s(1.0, [1.0, 1.0, 1.0]) == 0
    assert cost.straggler_wait_time_s(1.0, [1.0, 0.5]) < cost.straggler_wait_time_s(1.0, [1.0, 0.25])


def test_memory_terms():
    assert cost.param_memory_bytes(1e9, 2) == 2e9
    assert cost.grad_memory_bytes(1e9, 4) == 4e9
    assert non_increasing([cost.optimizer_memory_bytes(1e9, 12, n) for n in (1, 2, 8, 64)])
    assert cost.optimizer_memory_bytes(1e9, 12, 4) == 3e9
    acts = [cost.activation_memory_bytes(4096, 1000, n, 1) for n in (1, 2, 4)]
    assert increasing(acts)
    assert cost.activation_memory_bytes(4096, 1000, 2, 4) < cost.activation_memory_bytes(4096, 1000, 2, 1)
    # 1F1B: early stages hold more micro-batches; a short step holds fewer
    assert list(cost.in_flight_micro_batches(np.arange(4), 4, 16)) == [4, 3, 2, 1]
    assert list(cost.in_flight_micro_batches(np.arange(4), 4, 2)) == [2, 2, 2, 1]
    assert cost.logits_memory_bytes(4096, 32000, 2) < cost.logits_memory_bytes(4096, 32000, 1)
    assert cost.usable_memory_bytes(100) < 100
