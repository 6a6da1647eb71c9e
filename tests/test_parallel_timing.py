"""A rank's step split: on a CPU, time blocked in a collective (or asleep) is not compute, and a
simulated slow card's sleep is."""

from __future__ import annotations

import time

import torch
from torch import nn

from hyrun.runtime.parallel.timing import FORWARD_SHARE_OF_COMPUTE, CommTimer, StepClock


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

    # A half-speed card: its forward's CPU time is stretched by the sleep a card at speed 0.5 would need for
    # the whole forward + backward, and that sleep is compute. Compared with the same forward at full speed in
    # the same run; CPU time (not wall time) is the reference, so a loaded box moves both alike.
    compute_s, forward_cpu_s = {}, {}
    for speed in (1.0, 0.5):
        clock.speed = speed
        x = torch.ones(1024, 1024)
        clock.start()
        cpu_started = time.thread_time()
        module(x)  # tens of ms of CPU: the stretch is far above timer noise
        forward_cpu_s[speed] = time.thread_time() - cpu_started
        timing = clock.finish()
        assert timing.compute_s <= timing.step_s + 1e-9
        compute_s[speed] = timing.compute_s
    stretch_s = forward_cpu_s[0.5] / FORWARD_SHARE_OF_COMPUTE * (1 / 0.5 - 1)
    slowdown_s = compute_s[0.5] - compute_s[1.0]
    assert forward_cpu_s[0.5] > 0.005, forward_cpu_s
    # Sleep may overrun on a loaded box, never fall short.
    assert 0.5 * stretch_s <= slowdown_s <= 2.0 * stretch_s + 0.05, (slowdown_s, stretch_s, compute_s, forward_cpu_s)
