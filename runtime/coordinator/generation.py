"""One generation: one plan run by one set of workers, and what the coordinator has heard from
them. Mutated only by the orchestrator's ingest; decide() reads a frozen copy (view.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyrun.runtime.coordinator.actions import CardRef, Verdict
from hyrun.runtime.coordinator.lifecycle import GENERATION_TRANSITIONS, GenState, check_transition
from hyrun.runtime.coordinator.policy import RankFailure
from hyrun.runtime.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class RankSlot:
    """Where one rank of a generation runs."""

    rank: int
    node: str
    card_index: int
    card_type: str
    speed: float
    micro_batches: int

    @property
    def card(self) -> CardRef:
        return CardRef(self.node, self.card_index)


@dataclass(frozen=True)
class RankPlan:
    """What a generation runs: one slot per rank, and the parallel layout every rank builds."""

    slots: tuple[RankSlot, ...]
    layout: ParallelLayout | None  # None only when there is nothing to run (no slot)
    predicted_step_time_s: float | None = None  # the cost model's, where the planner made the plan


@dataclass
class Generation:
    number: int
    ranks: tuple[RankSlot, ...]
    layout: ParallelLayout
    started_s: float = 0.0
    state: GenState = GenState.STARTING
    reason: str = ""
    steps_by_rank: dict[int, int] = field(default_factory=dict)  # rank -> last step reported
    reduce_entered: dict[int, int] = field(default_factory=dict)  # rank -> step whose reduce it entered
    last_progress_s: float = 0.0  # any rank's last step or progress report
    last_report: dict = field(default_factory=dict)  # rank -> its last StepReport
    committed_step: int = 0  # newest checkpoint any rank reported committed (commits are all-ranks)
    saves_failed: int = 0  # saves rank 0 reported failed in this generation (a save fails on every rank alike)
    exited_ok: set[int] = field(default_factory=set)
    worker_pids: dict[int, int] = field(default_factory=dict)  # rank -> its worker's pid on its node
    failures: list[RankFailure] = field(default_factory=list)  # in the order they arrived
    failing_since: float | None = None  # first failure seen; the verdict waits a short grace
    # A drain in progress: verdicts carried out once a checkpoint newer than `drain_after_step`
    # commits, or at `drain_deadline_s` whatever the checkpoint.
    drain_verdicts: list[Verdict] = field(default_factory=list)
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

    def record_step(self, report, now_s: float) -> None:
        """A rank's StepReport (hyrun_pb2.StepReport)."""
        self.steps_by_rank[report.rank] = report.step
        self.last_progress_s = now_s
        self.last_report[report.rank] = report
        # Commits are all-ranks: one rank seeing a checkpoint committed means every rank's part is on disk.
        self.committed_step = max(self.committed_step, report.checkpoint_step)
        if report.rank == 0:
            self.saves_failed = max(self.saves_failed, report.checkpoint_failures)
        if self.state is GenState.STARTING and len(self.steps_by_rank) == self.world_size:
            # The hang clock starts once every rank has trained a step (start-up is the rendezvous' job).
            self.transition(GenState.RUNNING)

    def record_failure(self, failure: RankFailure) -> None:
        self.failures.append(failure)
        if self.failing_since is None:
            # decide() waits a short grace from here: the peers of a dead rank fail too.
            self.failing_since = failure.at_s
            self.transition(GenState.FAILING)

    def transition(self, new: GenState, reason: str = "") -> None:
        self.state = check_transition(GENERATION_TRANSITIONS, self.state, new, f"generation {self.number}")
        if reason:
            self.reason = reason

    @property
    def ended(self) -> bool:
        return self.state in (GenState.COMPLETED, GenState.STOPPED)
