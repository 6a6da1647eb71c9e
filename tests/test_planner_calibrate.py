"""Calibration folds measured busy times and link speeds back into the cluster."""

import pytest

from hyrun.planner import DATA_PARALLEL_ONLY, Cluster, TrainingConfig, calibrate, card_spec, search
from hyrun.planner.examples import tiny_shape

TRAINING = TrainingConfig(micro_batch_size=1, global_batch_sequences=28)


def cpu_cluster():
    return Cluster.from_nodes({"n0": [card_spec("cpu-sim")] * 2, "n1": [card_spec("cpu-sim")] * 2})


def test_a_card_measured_twice_as_slow_gets_half_the_speed_and_half_the_micro_batches():
    cluster = cpu_cluster()
    plan = search(cluster, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    measured = {card: seconds * (2.0 if card == 3 else 1.0) for card, seconds in plan.compute_time_by_card_s.items()}
    calibrated = calibrate(cluster, measured, plan=plan)
    assert calibrated.card(3).spec.speed == pytest.approx(0.5)
    assert calibrated.card(0).spec.speed == pytest.approx(1.0)
    replanned = search(calibrated, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    micro_batches = dict(zip(replanned.rank_to_card, replanned.micro_batches_per_replica))
    assert micro_batches == {0: 8, 1: 8, 2: 8, 3: 4}
    # the calibrated model now predicts what was measured, at the speed the card really ran
    again = search(calibrated, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    per_micro_batch = {c: t / micro_batches[c] for c, t in again.compute_time_by_card_s.items()}
    assert per_micro_batch[3] == pytest.approx(measured[3] / 7)  # it ran 7 of 28 in the first plan


def test_a_whole_cluster_running_slower_than_its_datasheet_is_corrected():
    cluster = cpu_cluster()
    plan = search(cluster, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    calibrated = calibrate(cluster, {c: 10 * t for c, t in plan.compute_time_by_card_s.items()}, plan=plan)
    again = search(calibrated, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    assert again.step_time_s == pytest.approx(10 * plan.step_time_s, rel=0.01)


def test_blend_moves_part_of_the_way_and_bandwidths_are_replaced():
    cluster = cpu_cluster()
    plan = search(cluster, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY).best
    calibrated = calibrate(cluster, {0: 4 * plan.compute_time_by_card_s[0]}, plan=plan, blend=0.5,
                           measured_inter_node_bandwidth_by_card={1: 3e8})
    assert calibrated.card(0).spec.speed == pytest.approx(0.5)
    assert calibrated.card(1).spec.inter_node_bandwidth_bytes_per_s == 3e8
    assert calibrated.card(1).spec.speed == 1.0


def test_calibration_refuses_bad_measurements():
    cluster = cpu_cluster()
    plan = search(cluster, tiny_shape(), TRAINING, constraints=DATA_PARALLEL_ONLY, excluded={3}).best
    with pytest.raises(ValueError, match="card 3 was measured but has no rank"):
        calibrate(cluster, {3: 1.0}, plan=plan)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        calibrate(cluster, {0: -1.0}, plan=plan)
    with pytest.raises(ValueError, match="blend"):
        calibrate(cluster, {0: 1.0}, plan=plan, blend=0)
