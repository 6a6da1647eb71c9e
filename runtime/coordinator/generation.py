"""The lifecycle of one generation (one plan run by one set of workers) as an explicit state
machine: an illegal transition raises instead of leaving the job in a state nobody planned for."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hyrun.runtime.parallel.layout import ParallelLayout


class GenState(enum.Enum):
    STARTING = "STARTING"    # StartGeneration sent; waiting for every worker to report a step
    RUNNING = "RUNNING"      # every rank has reported progress
    STOPPING = "STOPPING"    # a failure or stop request: workers are being stopped
    COMPLETED = "COMPLETED"  # every rank finished all its steps and exited 0
    FAILED = "FAILED"        # ended by a failure; the job may continue in a next generation


ALLOWED: dict[GenState, frozenset[GenState]] = {
    GenState.STARTING: frozenset({GenState.RUNNING, GenState.STOPPING, GenState.COMPLETED}),
    GenState.RUNNING: frozenset({GenState.STOPPING, GenState.COMPLETED}),
    GenState.STOPPING: frozenset({GenState.FAILED}),
    GenState.COMPLETED: frozenset(),
    GenState.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class RankSlot:
    """Where one rank of a generation runs."""

    rank: int
    node: str
    card_index: int
    card_type: str
    speed: float
    micro_batches: int


@dataclass(frozen=True)
class RankPlan:
    """What a generation runs: one slot per rank, and the parallel layout every rank builds."""

    slots: tuple[RankSlot, ...]
    layout: ParallelLayout | None  # None only when there is nothing to run (no slot)


@dataclass
class Generation:
    number: int
    ranks: tuple[RankSlot, ...]
    layout: ParallelLayout
    state: GenState = GenState.STARTING
    reason: str = ""
    # rank -> last step reported; rank -> exit code
    steps_by_rank: dict[int, int] = field(default_factory=dict)
    exited_ok: set[int] = field(default_factory=set)
    failures: list = field(default_factory=list)  # RankFailure, in the order they arrived
    failing_since: float | None = None  # first failure seen; the verdict waits a short grace
    reduce_entered: dict[int, int] = field(default_factory=dict)  # rank -> step whose reduce it entered
    last_progress_s: float = 0.0  # any rank's last step or progress report
    # A drain in progress: the verdicts to carry out once a checkpoint newer than
    # `drain_after_step` has committed (or at `drain_deadline_s`, whatever the checkpoint).
    last_report: dict = field(default_factory=dict)  # rank -> its last StepReport
    drain_verdicts: list = field(default_factory=list)
    drain_after_step: int = 0
    drain_deadline_s: float = 0.0

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def nodes(self) -> list[str]:
        return sorted({slot.node for slot in self.ranks})

    def slot(self, rank: int) -> RankSlot:
        return self.ranks[rank]

    def transition(self, new: GenState, reason: str = "") -> None:
        if new not in ALLOWED[self.state]:
            raise IllegalTransition(f"generation {self.number}: {self.state.value} -> {new.value} is not allowed")
        self.state = new
        if reason:
            self.reason = reason

    @property
    def ended(self) -> bool:
        return self.state in (GenState.COMPLETED, GenState.FAILED)
