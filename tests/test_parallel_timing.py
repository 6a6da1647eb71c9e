"""A rank's step split: on a CPU, time blocked in a collective (or asleep) is not compute, and a
simulated slow card's sleep is."""

from __future__ import annotations

import time

import torch
from torch import nn

from hyrun.runtime.parallel.timing import CommTimer, StepClock


class Waits(nn.Module):
    """Stands in for a forward that computes briefly and then blocks on a peer."""

    def forward(self, x):
        y = x @ x
        time.sleep(0.2)
        return y


def test_a_blocked_wait_is_comm_not_compute_and_a_slow_cards_sleep_is_compute():
    module, comm = Waits(), CommTimer()
    clock = StepClock(module, comm, pipelined=False, cpu=True)
    clock.start()
    with clock.backward():
        module(torch.ones(64, 64))
    timing = clock.finish()
    assert timing.step_s >= 0.2 and timing.compute_s < 0.1, timing
    assert timing.comm_wait_s >= 0.15 and abs(sum((timing.compute_s, timing.comm_wait_s, timing.bubble_s)) - timing.step_s) < 1e-9

    clock.speed = 0.5  # half-speed card: its forward's CPU time is stretched, and that is compute
    clock.start()
    module(torch.ones(512, 512))
    slowed = clock.finish()
    assert slowed.compute_s > 0 and slowed.compute_s <= slowed.step_s
