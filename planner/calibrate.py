"""Calibration: fold what a running job measured back into the cluster description, so the next plan
(a replan after an eviction, or the next generation) uses what the cards and links really do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from .cluster import Cluster
from .plan import Plan


def calibrate(cluster: Cluster, measured_step_times_by_card: Mapping[int, float], *, plan: Plan,
              blend: float = 1.0,
              measured_intra_node_bandwidth_by_card: Mapping[int, float] | None = None,
              measured_inter_node_bandwidth_by_card: Mapping[int, float] | None = None) -> Cluster:
    """The cluster with each measured card's `speed` rescaled so the cost model predicts its measured
    time under `plan`, and optionally its link bandwidths replaced by measured ones (bytes/s).

    `measured_step_times_by_card`: card global id → seconds the card was busy computing in one step
    (forward and backward of its micro-batches), *not* counting time blocked in collectives: a rank's
    wall step time includes waiting for the slowest rank and says nothing about its own speed.
    `blend` in (0, 1] moves the speed part of the way (geometric), to damp noisy measurements.
    Cards not measured keep their spec.
    """
    if not 0 < blend <= 1:
        raise ValueError(f"blend={blend} must be in (0, 1]: 1 takes the measurement as it is")
    predicted = plan.compute_time_by_card_s
    specs = {}
    for card_id, measured_s in measured_step_times_by_card.items():
        if not (isinstance(measured_s, (int, float)) and math.isfinite(measured_s) and measured_s > 0):
            raise ValueError(f"card {card_id}: measured step time {measured_s!r} must be a finite number > 0 (s)")
        if card_id not in predicted:
            raise ValueError(f"card {card_id} was measured but has no rank in the plan "
                             f"(plan uses cards {sorted(predicted)})")
        spec = cluster.card(card_id).spec
        # Predicted time scales as 1/speed (compute and memory traffic both do), so this ratio is
        # exactly the speed that reproduces the measurement.
        ratio = predicted[card_id] / measured_s
        specs[card_id] = dataclasses.replace(spec, speed=spec.speed * ratio ** blend)
    for field, measured in (("intra_node_bandwidth_bytes_per_s", measured_intra_node_bandwidth_by_card),
                            ("inter_node_bandwidth_bytes_per_s", measured_inter_node_bandwidth_by_card)):
        for card_id, bandwidth in (measured or {}).items():
            if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
                raise ValueError(f"card {card_id}: measured {field}={bandwidth!r} must be a finite number > 0")
            spec = specs.get(card_id) or cluster.card(card_id).spec
            specs[card_id] = dataclasses.replace(spec, **{field: float(bandwidth)})
    return cluster.with_specs(specs)
