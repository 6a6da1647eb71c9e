"""Runs a job as a sequence of generations. Messages only update state (ingest); on every policy
tick the orchestrator takes a frozen view, asks `decide()` what to do, and applies the actions:
commands to agents, generation start and stop, store writes, metrics and log lines rendered from
the actions' evidence. Called only from the coordinator's event loop (no locks); time is passed
in; commands leave through `send`, job events through `publish`, so tests drive it directly with
injected planning and rendezvous.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import (
    Action,
    BeginDrain,
    CardRef,
    Cause,
    Evidence,
    FailJob,
    FinishJob,
    HoldEvictions,
    MarkNodeLost,
    Note,
    Quarantine,
    Readmit,
    Recover,
    ReleaseHold,
    StartJob,
    VerdictKind,
    describe_all,
)
from hyrun.runtime.coordinator.commands import checkpoint_command, start_commands, stop_command
from hyrun.runtime.coordinator.decide import decide
from hyrun.runtime.coordinator.generation import Generation, RankPlan
from hyrun.runtime.coordinator.ingest import JobIngest, JobRejected
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.membership import Membership
from hyrun.runtime.coordinator.ranks import plan_ranks
from hyrun.runtime.coordinator.planning import Measured
from hyrun.runtime.coordinator.records import QUARANTINE_VERDICT, build_view
from hyrun.runtime.coordinator.store import Deposed
from hyrun.runtime.coordinator.store_writer import StoreUnavailable, StoreWriter
from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.metrics import CoordinatorMetrics

log = logging.getLogger("hyrun.coordinator")


class Rendezvous(Protocol):
    """A generation's rendezvous store (rendezvous.py): workers meet there, it dies with the generation."""

    info: object

    def close(self) -> None: ...


# (bind_host, advertise_host, job_id, generation, world_size) -> Rendezvous. Injected so the
# coordinator needs no torch (the real one is torch's TCPStore) and tests need no sockets.
RendezvousFactory = Callable[[str, str, str, int, int], Rendezvous]
PlanFn = Callable[[JobSpec, Membership, set, Measured], RankPlan]


@dataclass(frozen=True)
class OrchestratorSettings:
    run_root: str                   # runs/ : a job's logs go to run_root/JOB_ID
    bind_host: str = "127.0.0.1"    # where generation stores listen
    advertise_host: str = "127.0.0.1"
    heartbeat_timeout_s: float = 5.0
    durable_write_timeout_s: float = 30.0  # a generation starts only once the store has its number


class Orchestrator(JobIngest):
    def __init__(
        self,
        *,
        membership: Membership,
        writer: StoreWriter,
        metrics: CoordinatorMetrics,
        send: Callable[[str, pb.CoordinatorCommand], None],
        publish: Callable[[pb.JobEvent], None],
        settings: OrchestratorSettings,
        open_rendezvous: RendezvousFactory,
        plan: PlanFn = plan_ranks,
        close_stream: Callable[[str], None] = lambda node: None,
    ) -> None:
        super().__init__(membership=membership, writer=writer, metrics=metrics, publish=publish,
                         run_root=settings.run_root, heartbeat_timeout_s=settings.heartbeat_timeout_s)
        self.send = send
        self.settings = settings
        self.open_rendezvous = open_rendezvous
        self.plan = plan
        self.close_stream = close_stream
        self._rendezvous: Rendezvous | None = None
        self.stalled_until_s = float("-inf")  # end of the coordinator's own last stall
        self.hold_since_s: float | None = None
        self._noted: dict[tuple, float] = {}  # log lines of repeated notes, rate-limited

    def drain_node(self, node: str, reason: str, now_s: float) -> str:
        """A planned leave (operator, tidal scheduling): the node's cards leave after a checkpoint
        and are not used again by this job."""
        self._check_operator_target(node)
        cards = [CardRef(node, card.index) for card in self.membership.nodes[node].cards]
        evidence = Evidence.of(Cause.OPERATOR_DRAIN, colon=": " if reason else "", reason=reason)
        self.job.drain_requests.update({card: evidence for card in cards})
        gen = self.job.generation
        if gen is None or gen.ended or node not in gen.nodes:
            return f"node {node} will not be used by this job"
        return f"draining node {node}: checkpoint, then continue without its {len(cards)} cards"

    def _check_operator_target(self, node: str) -> None:
        """An operator command names a node of this coordinator, while a job runs."""
        if node not in self.membership.nodes:
            raise JobRejected(f"no node {node!r}; known: {', '.join(sorted(self.membership.nodes)) or 'none'}")
        if self.job is None or self.job.ended:
            raise JobRejected("no job is running")

    def readmit_cards(self, node: str, indices: list[int], reason: str) -> str:
        """An operator gave cards back (repaired, replaced, lent again): their quarantine ends and
        they join the running job at its next checkpoint."""
        self._check_operator_target(node)
        known = [card.index for card in self.membership.nodes[node].cards]
        if unknown := sorted(set(indices) - set(known)):
            raise JobRejected(f"node {node} has no card {', '.join(map(str, unknown))}; its cards: "
                              f"{', '.join(map(str, known))}")
        cards = [CardRef(node, index) for index in (indices or known)]
        gen = self.job.generation
        running = {slot.card for slot in gen.ranks} if gen is not None and not gen.ended else set()
        evidence = Evidence.of(Cause.OPERATOR_READMIT, colon=": " if reason else "", reason=reason)
        back = []
        for card in cards:
            was = self.job.evicted.pop(card, None) or self.job.drain_requests.pop(card, None)
            if card not in running:
                self.job.readmit_requests[card] = evidence
                back.append(f"{card}" + (f" (was: {was.describe()})" if was else ""))
        self._save_job()
        if not back:
            return f"{', '.join(map(str, cards))} already train in this job"
        log.warning("readmit %s: %s", "; ".join(back), evidence.describe())
        return f"readmitted {', '.join(back)}: joins at the next checkpoint"

    def note_loop_lag(self, lag_s: float, now_s: float) -> None:
        """The event loop ran `lag_s` late. A stall of half a heartbeat timeout or more is the
        coordinator's own: node silence is counted again from its end, never charged to agents.
        (Shorter lags on a busy loop only delay beats that are still read, and must not reset the
        clocks: a loop that always lags a little would otherwise never see a node die.)"""
        self.metrics.note_loop_lag(lag_s, now_s)
        if lag_s >= self.settings.heartbeat_timeout_s / 2:
            self.stalled_until_s = now_s
            log.warning("coordinator loop stalled %.1f s: node silence is counted from now", lag_s)

    # ------------------------------------------------------------------ policy (timer)

    def tick(self, now_s: float) -> None:
        if self.job is None:
            return
        view = build_view(
            self.job, self.membership, self.health, stalled_until_s=self.stalled_until_s, hold_since_s=self.hold_since_s
        )
        for action in decide(now_s, view, self.decide_settings):
            self.apply(action, now_s)
        if self.job.record_store_outage(self.writer.outage_since_s is not None, now_s):
            self._publish()
        self.metrics.cards_health.set_quarantined(frozenset((c.node, c.index) for c in self.job.evicted))

    def apply(self, action: Action, now_s: float) -> None:
        match action:
            case StartJob():
                self._start_first(now_s)
            case MarkNodeLost(node=node, evidence=evidence):
                if self.membership.mark_lost(node) is not None:
                    log.warning("%s", evidence.describe())
                    self.close_stream(node)
                    self._update_membership_metrics()
                    self._publish()
            case Recover():
                self._recover(action, now_s)
            case BeginDrain(verdicts=verdicts):
                self._begin_drain(list(verdicts), now_s)
            case Quarantine(cards=cards, evidence=evidence):
                for card in cards:
                    self.job.evicted[card] = self.job.drain_requests.pop(card, evidence)
                log.warning("quarantine %s (not in the running generation): %s", ", ".join(map(str, cards)),
                            evidence.describe())
                self.job.add_incident(QUARANTINE_VERDICT, evidence.describe(), now_s, cards)
            case Readmit(cards=cards, evidence=evidence):
                for card in cards:
                    self.job.evicted.pop(card, None)
                log.info("readmitting %s: %s", ", ".join(map(str, cards)), evidence.describe())
            case HoldEvictions(evidence=evidence, since_s=since_s):
                self.hold_since_s = since_s
                log.warning("%s", evidence.describe())
            case ReleaseHold():
                self.hold_since_s = None
                log.info("mass silence over: evictions resume")
            case Note(evidence=evidence):
                key = (evidence.cause, evidence["node"])
                if now_s - self._noted.get(key, float("-inf")) >= 10.0:
                    self._noted[key] = now_s
                    log.info("%s", evidence.describe())
            case FailJob(evidence=evidence):
                self._fail_job(describe_all(evidence))
            case FinishJob(evidence=evidence):
                self._finish_job(evidence)
            case _:
                raise TypeError(f"unknown action {action!r}")

    # ------------------------------------------------------------------ mechanism

    def _begin_drain(self, verdicts: list, now_s: float) -> None:
        job, gen = self.job, self.job.generation
        for verdict in verdicts:
            job.drain_requests.pop(verdict.card, None)
        if gen.state is not GenState.DRAINING:
            gen.transition(GenState.DRAINING)
            gen.drain_after_step = job.step
            gen.drain_deadline_s = now_s + job.spec.fault_tolerance.drain_timeout_s
            reason = "; ".join(f"{v.card}: {v.reason}" for v in verdicts)
            log.warning("draining %s: checkpoint first", reason)
            for node in gen.nodes:
                self.send(node, checkpoint_command(gen, reason))
        gen.drain_verdicts.extend(verdicts)

    def _recover(self, action: Recover, now_s: float) -> None:
        """Applies the verdicts (evict, replan, join), ends the generation, starts the next."""
        job = self.job
        if action.committed_step is not None:
            # Commits are all-ranks: nothing up to the committed step will be trained again.
            job.step = max(job.step, action.committed_step)
        for verdict in action.verdicts:
            if verdict.kind is VerdictKind.REPLAN and verdict.evidence.cause is Cause.LINK_CONGESTED:
                job.measured_link_mbit[verdict.card.node] = verdict.evidence["mbit"]  # stays in the job, planned for
            elif verdict.kind is VerdictKind.REPLAN:
                job.measured_speed[verdict.card] = verdict.speed  # stays in the job, planned for
            elif verdict.kind is not VerdictKind.JOIN:
                job.evicted[verdict.card] = verdict.evidence
                if verdict.evidence.cause is Cause.WORKER_EXIT and verdict.evidence["exit_code"] > 0:
                    signature = verdict.evidence["signature"]
                    job.blamed_errors[signature] = job.blamed_errors.get(signature, ()) + (verdict.card,)
            job.drain_requests.pop(verdict.card, None)
            job.readmit_requests.pop(verdict.card, None)  # taken back, or left out by this plan: asked once
            self.health.forget(verdict.card)
            log.warning("%s %s: %s", verdict.kind.value, verdict.card, verdict.reason)
        reason = describe_all(action.evidence) or "generation restarted"
        log.warning("generation %d ends: %s", job.generation.number, reason)
        verdict = action.verdicts[0].kind.value if action.verdicts else "restart"
        incident = job.add_incident(verdict, reason, now_s, [v.card for v in action.verdicts])
        self.exports.recovering(action, incident, now_s)
        self._end_generation(reason)
        job.step_at_failure = job.step
        if job.generations_started >= job.spec.fault_tolerance.max_generations:
            self._fail_job(f"{reason}; gave up after {job.generations_started} generations")
            return
        try:
            ranks = self.plan(job.spec, self.membership, set(job.evicted), Measured(job.measured_speed, job.measured_link_mbit))
        except ValueError as error:
            self._fail_job(f"{reason}; {error}")
            return
        if not ranks.slots:
            self._fail_job(f"{reason}; no usable card is left")
            return
        job.tallies.clear()
        self.health.new_generation()
        self._start_generation(ranks, now_s)

    def _start_first(self, now_s: float) -> None:
        try:
            ranks = self.plan(self.job.spec, self.membership, set(self.job.evicted), Measured())
        except ValueError as error:
            self._fail_job(str(error))
            return
        self.job.transition(JobState.RUNNING)
        self._start_generation(ranks, now_s)

    def _start_generation(self, plan: RankPlan, now_s: float) -> None:
        job = self.job
        job.generations_started += 1
        gen = Generation(job.generations_started, plan.slots, plan.layout, started_s=now_s, last_progress_s=now_s)
        job.generation = gen
        # Durable before any agent hears of it: a coordinator taking over never starts this number again.
        try:
            self.writer.wait(self._save_job(), self.settings.durable_write_timeout_s)
        except (StoreUnavailable, Deposed) as error:
            job.generation = None
            self._fail_job(f"generation {gen.number} not started: {error}")
            return
        self._rendezvous = self.open_rendezvous(
            self.settings.bind_host, self.settings.advertise_host, job.job_id, gen.number, gen.world_size
        )
        info = self._rendezvous.info
        commands = start_commands(gen, info, backend=job.spec.runtime.backend, job_json=job.spec.to_json(), run_dir=job.run_dir)
        for node, command in commands.items():
            self.send(node, command)
        self.exports.generation_started(gen.number, gen.ranks, plan.predicted_step_time_s, now_s)
        log.info("generation %d started: %d ranks on %s (%s)", gen.number, gen.world_size, ", ".join(gen.nodes),
                 gen.layout.describe())
        self._publish()

    def _end_generation(self, reason: str, completed: bool = False) -> None:
        gen = self.job.generation
        if gen is None or gen.ended:
            return
        if not completed:
            for node in gen.nodes:
                if node in self.membership.nodes and self.membership.nodes[node].connected:
                    self.send(node, stop_command(gen, reason))
        gen.transition(GenState.COMPLETED if completed else GenState.STOPPED, reason)
        if self._rendezvous is not None:
            self._rendezvous.close()
            self._rendezvous = None

    def _finish_job(self, evidence: Evidence) -> None:
        job = self.job
        self._end_generation("every rank finished", completed=True)
        job.transition(JobState.COMPLETED)
        self.exports.job_ended()
        job.message = evidence.describe()
        log.info("job %s completed: %s", job.job_id, job.message)
        self._save_job()
        self._publish()

    def _fail_job(self, reason: str) -> None:
        job = self.job
        if job is None or job.ended:
            return
        self._end_generation(reason)
        job.transition(JobState.FAILED)
        self.exports.job_ended()
        job.message = reason
        self.metrics.job_failures_total.inc()
        log.error("job %s failed: %s", job.job_id, reason)
        self._save_job()
        self._publish()
