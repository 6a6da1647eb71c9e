"""Where a rank's step time goes: computing, waiting on communication, or idle in the pipeline bubble.

Forward compute is measured (hooks on the rank's module); the backward is timed where the runner
calls it, or, inside a pipeline schedule, taken as twice the forward (the trainer loop's
convention). On a CPU both are the thread's CPU time, which leaves out time blocked in collectives
(also those autograd runs inside the backward) and time descheduled on a shared machine; on a GPU
they are wall time less the explicit collectives, an upper bound. Explicit collectives (expert
all-to-all, context-parallel gathers) are timed where they are called. What is left of the step is
communication wait without a pipeline (FSDP gathers and reduce-scatters, TP all-reduces), and bubble
with one (fill, drain, waits on neighbours).

A simulated card slower than this machine (`speed` < 1) sleeps after each forward for the extra
time its whole forward + backward would take; that sleep counts as compute (it is what the slower
card would spend computing).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

from torch import nn

_BACKWARD_PER_FORWARD = 2.0
# A forward is about a third of a micro-batch's compute (the backward costs twice as much).
FORWARD_SHARE_OF_COMPUTE = 1 / (1 + _BACKWARD_PER_FORWARD)


def throttle(compute_s: float, speed: float) -> float:
    """Sleeps so that work that took `compute_s` takes compute_s / speed; returns the time slept."""
    if speed >= 1.0:
        return 0.0
    extra_s = compute_s * (1.0 / speed - 1.0)
    time.sleep(extra_s)
    return extra_s


@dataclass(frozen=True)
class StepTiming:
    step_s: float
    compute_s: float
    comm_wait_s: float
    bubble_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class CommTimer:
    """Context manager summing the wall time of the blocking collectives run inside it."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._started = 0.0

    def __enter__(self) -> "CommTimer":
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.total_s += time.perf_counter() - self._started


class StepClock:
    """Times one step of one rank's module; `finish()` splits it into a `StepTiming`."""

    def __init__(self, module: nn.Module, comm: CommTimer, *, pipelined: bool, cpu: bool = True) -> None:
        """`cpu`: the rank computes on the CPU, so compute is its thread's CPU time — what it spent
        computing, not waiting in a collective (gloo blocks its caller without burning CPU) or
        descheduled on a shared machine. On a GPU, wall time (kernels run beside the thread)."""
        self.comm, self.pipelined, self.cpu = comm, pipelined, cpu
        self._now = time.thread_time if cpu else time.perf_counter
        self.speed = 1.0  # a simulated card's speed this step (see the module docstring)
        self._forward_s = 0.0
        self._forward_started = 0.0
        self._forward_cpu_started = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)
        self.start()

    def _pre(self, module, args) -> None:
        self._forward_started = self._now()
        self._forward_cpu_started = time.thread_time()
        self._comm_at_start = self.comm.total_s

    def _post(self, module, args, output) -> None:
        # Wall time holds the explicit collectives' waits; CPU time does not.
        comm_inside = 0.0 if self.cpu else self.comm.total_s - self._comm_at_start
        self._forward_s += max(0.0, self._now() - self._forward_started - comm_inside)
        # CPU time, not wall: on a shared machine a descheduled rank must not slow itself further.
        busy_s = (time.thread_time() - self._forward_cpu_started) / FORWARD_SHARE_OF_COMPUTE
        self._slowdown_s += throttle(busy_s, self.speed)

    @contextlib.contextmanager
    def backward(self):
        started, comm_before = self._now(), self.comm.total_s
        yield
        self._backward_s = (self._backward_s or 0.0) + self._now() - started
        self.comm.total_s = comm_before  # what autograd communicates is inside the backward time

    def start(self) -> None:
        self._backward_s: float | None = None
        self._forward_s = 0.0
        self._slowdown_s = 0.0
        self.comm.total_s = 0.0
        self._step_started = time.perf_counter()

    def finish(self) -> StepTiming:
        step_s = time.perf_counter() - self._step_started
        backward_s = self._forward_s * _BACKWARD_PER_FORWARD if self._backward_s is None else self._backward_s
        compute_s = min(step_s, self._forward_s + backward_s + self._slowdown_s)
        comm_s = min(self.comm.total_s, step_s - compute_s)  # a spinning wait can count in both
        rest_s = step_s - compute_s - comm_s
        if self.pipelined:
            return StepTiming(step_s, compute_s, comm_s, rest_s)
        return StepTiming(step_s, compute_s, comm_s + rest_s, 0.0)
