"""The coordinator's mutable job state (one JobRecord per job) and the frozen View decide() reads
of it. Only the orchestrator mutates a record; `build_view` copies what decide() needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import CardRef, Evidence
from hyrun.runtime.coordinator.evaluations import EvalBook
from hyrun.runtime.coordinator.generation import Generation
from hyrun.runtime.coordinator.health import HealthBook
from hyrun.runtime.coordinator.lifecycle import JOB_TRANSITIONS, JobState, check_transition
from hyrun.runtime.coordinator.membership import Membership
from hyrun.runtime.coordinator.view import DecideSettings, GenerationView, JobView, NodeView, View
from hyrun.runtime.jobfile import JobSpec

# Incidents that end no generation, so no resume belongs to them: idle cards kept out of the job, a
# checkpoint save that failed (training goes on from the previous one), the job-state store out of
# reach (the coordinator carries on; its writes wait and catch up).
QUARANTINE_VERDICT = "quarantine"
SAVE_FAILED_VERDICT = "save_failed"
STORE_OUTAGE_VERDICT = "store_outage"
_NO_RESTART = (QUARANTINE_VERDICT, SAVE_FAILED_VERDICT, STORE_OUTAGE_VERDICT)


@dataclass
class StepTally:
    """Reports for one step, until every rank has sent one."""

    loss_times_tokens: float = 0.0
    tokens: int = 0
    max_step_time_s: float = 0.0
    nonfinite: bool = False  # some rank's gradients were not finite: every rank skipped the update
    ranks: set[int] = field(default_factory=set)


@dataclass
class JobRecord:
    job_id: str
    spec: JobSpec
    run_dir: str
    submitted_s: float
    state: JobState = JobState.PENDING
    generation: Generation | None = None
    generations_started: int = 0
    step: int = 0
    loss: float = float("nan")
    tokens_per_s: float = 0.0
    step_time_s: float = 0.0
    message: str = ""
    tallies: dict[int, StepTally] = field(default_factory=dict)
    evicted: dict[CardRef, Evidence] = field(default_factory=dict)  # quarantined for the rest of the job
    measured_speed: dict[CardRef, float] = field(default_factory=dict)  # stragglers: what the planner now assumes
    measured_link_mbit: dict[str, float] = field(default_factory=dict)  # congested links (per node): the same
    drain_requests: dict[CardRef, Evidence] = field(default_factory=dict)  # operator drains not yet carried out
    readmit_requests: dict[CardRef, Evidence] = field(default_factory=dict)  # repaired cards not yet taken back
    blamed_errors: dict[str, tuple[CardRef, ...]] = field(default_factory=dict)  # error signature -> cards evicted for it
    steps_lost: int = 0
    step_at_failure: int | None = None  # job.step when the last generation failed
    last_step_s: float = 0.0  # when job.step completed
    saved_s: float = 0.0      # when job state was last written to the store
    incidents: list[pb.Incident] = field(default_factory=list)
    evals: EvalBook = field(default_factory=EvalBook)  # the evaluation beside training's newest results

    @property
    def ended(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED)

    def transition(self, new: JobState) -> None:
        self.state = check_transition(JOB_TRANSITIONS, self.state, new, f"job {self.job_id}")

    def tally(self, report: pb.StepReport, world_size: int) -> StepTally | None:
        """Adds a rank's report to its step; returns the step's tally once every rank has reported."""
        tally = self.tallies.setdefault(report.step, StepTally())
        tally.loss_times_tokens += report.loss * report.tokens
        tally.tokens += report.tokens
        tally.max_step_time_s = max(tally.max_step_time_s, report.step_time_s)
        tally.nonfinite = tally.nonfinite or report.nonfinite_grads > 0
        tally.ranks.add(report.rank)
        return self.tallies.pop(report.step) if len(tally.ranks) == world_size else None

    def resuming_incident(self) -> pb.Incident:
        """The newest incident that ended a generation: the one a resumed generation answers."""
        return next(i for i in reversed(self.incidents) if i.verdict not in _NO_RESTART)

    def add_incident(self, verdict: str, reason: str, now_s: float, cards=(), generation: int | None = None) -> pb.Incident:
        """Records an incident as of now: in the running generation (or `generation`), at the job's step."""
        if generation is None:
            generation = self.generation.number if self.generation else 0
        incident = pb.Incident(
            detected_at_s=now_s - self.submitted_s, cards=[str(c) for c in cards], verdict=verdict, reason=reason,
            generation=generation, step_at_failure=self.step, last_step_before_s=self.last_step_s - self.submitted_s,
        )  # fmt: skip
        self.incidents.append(incident)
        return incident

    def record_store_outage(self, outage: bool, now_s: float) -> bool:
        """Opens an incident when the store became unreachable, closes it (resumed) when the writes
        caught up; True when either happened."""
        open_ = next((i for i in reversed(self.incidents) if i.verdict == STORE_OUTAGE_VERDICT and not i.resumed_at_s), None)
        if outage and open_ is None:
            self.add_incident(STORE_OUTAGE_VERDICT, "the job-state store is unreachable: training goes on, the "
                              "coordinator's writes wait for it", now_s)
            return True
        if not outage and open_ is not None:
            open_.resumed_at_s, open_.resumed_step = now_s - self.submitted_s, self.step
            return True
        return False

    def record_failed_save(self, error: str, generation: int, now_s: float) -> None:
        """A save failed on every rank (a full disk, a permission): no card is at fault and nothing
        stops, but the operator sees it beside the evictions."""
        reason = f"a checkpoint save failed, training goes on from the previous one: {error or 'no reason given'}"
        self.add_incident(SAVE_FAILED_VERDICT, reason, now_s, generation=generation)

    def complete_step(self, step: int, tally: StepTally, now_s: float) -> int:
        """Every rank finished `step`; returns the steps trained again (first step after a resume)."""
        lost = 0
        self.last_step_s = now_s
        if self.step_at_failure is not None:
            # First step of a resumed generation: everything past its checkpoint is trained again.
            lost = max(0, self.step_at_failure - (step - 1))
            self.steps_lost += lost
            incident = self.resuming_incident()
            incident.resumed_at_s, incident.resumed_step, incident.steps_lost = now_s - self.submitted_s, step, lost
            self.step_at_failure = None
        self.step = step
        self.loss = tally.loss_times_tokens / max(tally.tokens, 1)
        self.step_time_s = tally.max_step_time_s
        self.tokens_per_s = tally.tokens / tally.max_step_time_s if tally.max_step_time_s > 0 else 0.0
        return lost


def decide_settings(spec: JobSpec, heartbeat_timeout_s: float) -> DecideSettings:
    ft = spec.fault_tolerance
    return DecideSettings(
        heartbeat_timeout_s=heartbeat_timeout_s,
        node_startup_grace_s=3 * heartbeat_timeout_s,
        node_wait_timeout_s=spec.runtime.node_wait_timeout_s,
        failure_grace_s=ft.failure_grace_s,
        job_error_wait_s=max(5.0, ft.failure_grace_s),
        drain_timeout_s=ft.drain_timeout_s,
        hang_timeout_s=ft.hang_timeout_s,
        mass_silence_hold_s=max(30.0, 6 * heartbeat_timeout_s),
        health=spec.health,
    )


def build_view(
    job: JobRecord,
    membership: Membership,
    health: HealthBook,
    *,
    stalled_until_s: float,
    hold_since_s: float | None,
) -> View:
    nodes = {
        n.name: NodeView(n.name, n.alive, n.connected, n.last_heartbeat_s, n.registered_s, tuple(c.index for c in n.cards))
        for n in membership.nodes.values()
    }
    cards = {card: h.view() for card, h in health.cards.items()}
    gen = job.generation
    gen_view = None
    if gen is not None:
        gen_view = GenerationView(
            number=gen.number, state=gen.state, ranks=gen.ranks, started_s=gen.started_s,
            steps_by_rank=dict(gen.steps_by_rank), reduce_entered=dict(gen.reduce_entered),
            last_progress_s=gen.last_progress_s, committed_step=gen.committed_step,
            exited_ok=frozenset(gen.exited_ok), failures=tuple(gen.failures), failing_since=gen.failing_since,
            drain_verdicts=tuple(gen.drain_verdicts), drain_after_step=gen.drain_after_step,
            drain_deadline_s=gen.drain_deadline_s,
            nonfinite_by_step=health.completed_nonfinite(gen.world_size),
            seconds_per_micro_batch={c: tuple(t) for c, t in health.seconds_per_micro_batch.items()},
        )  # fmt: skip
    job_view = JobView(
        state=job.state, node_names=tuple(n.name for n in job.spec.cluster.nodes), submitted_s=job.submitted_s,
        step=job.step, total_steps=job.spec.training.steps, fault_tolerance=job.spec.fault_tolerance.enabled, checkpoints=job.spec.checkpoint.enabled,
        evicted=dict(job.evicted), measured_speed=dict(job.measured_speed), measured_link_mbit=dict(job.measured_link_mbit), drain_requests=dict(job.drain_requests),
        readmit_requests=dict(job.readmit_requests),
        blamed_errors=dict(job.blamed_errors), generation=gen_view,
    )  # fmt: skip
    nics = {node: tuple(samples) for node, samples in health.data_nics.items()}
    return View(job_view, nodes, cards, stalled_until_s, hold_since_s, nics)
