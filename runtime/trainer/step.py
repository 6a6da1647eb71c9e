"""What one training step of an engine returns, whichever engine ran it (`ReplicatedEngine` for plain
data parallelism, `PlannedEngine` for any 5D layout): the loss and where the rank's time went."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepWork:
    ce: float  # mean cross-entropy over this rank's replica's micro-batches
    compute_s: float  # busy computing (a simulated card's slowdown included)
    comm_wait_s: float  # waiting on collectives
    bubble_s: float  # idle in the pipeline bubble
    grad_norm: float  # this rank's local gradient norm (before reduction where the engine can see it)
    nonfinite: int  # local numeric faults: non-finite local gradients, or forwards that produced NaN
