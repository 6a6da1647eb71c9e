"""Runs a job as a sequence of generations: waits for the job's nodes, assigns a rank to every card,
starts the generation, folds the workers' step reports into job progress, and ends the job when
every rank finishes or one fails. Called only from the coordinator's event loop (no locks); time is
passed in; commands leave through `send` and progress through `publish`, so tests drive it directly.

When a worker fails or a node is lost, the policy (policy.py) names the bad cards; they are
evicted (quarantined for the rest of the job), the generation ends, and the next one starts on the
cards that remain, resuming from the newest checkpoint. With fault tolerance off, the first failure
ends the job with an error naming the node, the card and the reason.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.generation import Generation, GenState, RankPlan, RankSlot
from hyrun.runtime.parallel.layout import ParallelLayout
from hyrun.runtime.coordinator.health import HealthBook
from hyrun.runtime.coordinator.membership import Membership, NodeRecord
from hyrun.runtime.coordinator.policy import (
    CardRef,
    RankFailure,
    Verdict,
    VerdictKind,
    blame_exits,
    describe_hang,
    hung_ranks,
    lost_node_verdicts,
)
from hyrun.runtime.coordinator.store import Store
from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.metrics import CoordinatorMetrics

log = logging.getLogger("hyrun.coordinator")


class JobState(enum.Enum):
    PENDING = "PENDING"      # waiting for the job's nodes to register
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class JobRejected(ValueError):
    """A submission the coordinator cannot take (another job running, nodes unknown...)."""


@dataclass(frozen=True)
class OrchestratorSettings:
    run_root: str                   # runs/ : a job's logs go to run_root/JOB_ID
    bind_host: str = "127.0.0.1"    # where generation stores listen
    advertise_host: str = "127.0.0.1"


@dataclass
class StepTally:
    """Reports for one step, until every rank has sent one."""

    loss_times_tokens: float = 0.0
    tokens: int = 0
    max_step_time_s: float = 0.0
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
    evicted: dict[CardRef, str] = field(default_factory=dict)  # quarantined for the rest of the job
    measured_speed: dict[CardRef, float] = field(default_factory=dict)  # stragglers: what the planner now assumes
    steps_lost: int = 0
    step_at_failure: int | None = None  # job.step when the last generation failed
    last_step_s: float = 0.0  # when job.step completed
    saved_s: float = 0.0      # when job state was last written to the store
    incidents: list[pb.Incident] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.state in (JobState.COMPLETED, JobState.FAILED)


def assign_ranks(
    spec: JobSpec, membership: Membership, excluded: frozenset[CardRef] | set[CardRef] = frozenset()
) -> RankPlan:
    """Plain data parallelism: one rank per usable card (live node, not evicted), nodes in job-file
    order, micro-batches split as evenly as whole numbers allow (the first ranks take the rest)."""
    cards = [
        (name, card)
        for name in (n.name for n in spec.cluster.nodes)
        if name in membership.nodes and membership.nodes[name].alive and membership.nodes[name].connected
        for card in membership.nodes[name].cards
        if CardRef(name, card.index) not in excluded
    ]
    if not cards:
        return RankPlan((), None)
    total = spec.training.micro_batches_per_step
    base, extra = divmod(total, len(cards))
    slots = tuple(
        RankSlot(rank, node, card.index, card.type, card.speed, base + (1 if rank < extra else 0))
        for rank, (node, card) in enumerate(cards)
    )
    return RankPlan(slots, ParallelLayout.data_parallel([slot.micro_batches for slot in slots]))


def plan_ranks(
    spec: JobSpec,
    membership: Membership,
    excluded: frozenset[CardRef] | set[CardRef] = frozenset(),
    measured_speed: dict[CardRef, float] | None = None,
) -> RankPlan:
    """The ranks of the next generation on the usable cards: the planner's plan (`parallelism: auto`:
    any layout, each card's work in proportion to its capability; explicit degrees: those degrees,
    with dp shrunk to the cards left after a loss), or, for `auto` where the planner finds none, an
    even data-parallel split (it says why in the log). Raises ValueError when explicit degrees no
    longer fit."""
    even = assign_ranks(spec, membership, excluded)
    if not even.slots:
        return even
    from hyrun.runtime.planning import plan_for_run, planner_inputs, rank_plan

    usable = {CardRef(s.node, s.card_index) for s in even.slots}
    cluster, _, _ = planner_inputs(spec)
    unusable = {CardRef(c.node, c.local_index) for c in cluster.cards} - usable
    speeds = {CardRef(s.node, s.card_index): s.speed for s in even.slots}
    try:
        plan = plan_for_run(spec, excluded=unusable, measured_speed=measured_speed)
    except (ValueError, KeyError) as error:
        if spec.parallelism != "auto":
            raise ValueError(f"the job's parallelism {spec.parallelism.degrees()} does not fit the "
                             f"{len(usable)} usable cards: {error}") from None
        log.warning("planner found no plan (%s); splitting the batch evenly", error)
        return even
    return rank_plan(plan, cluster, speeds)


def describe_exit(slot: RankSlot, exit_msg: pb.WorkerExit) -> str:
    where = f"rank {slot.rank} on node {slot.node} card {slot.card_index} ({slot.card_type})"
    log_hint = f"; log: {exit_msg.log_path}" if exit_msg.log_path else ""
    return f"{where} {exit_msg.reason}{log_hint}"


class Orchestrator:
    def __init__(
        self,
        *,
        membership: Membership,
        store: Store,
        metrics: CoordinatorMetrics,
        send: Callable[[str, pb.CoordinatorCommand], None],
        publish: Callable[[pb.JobEvent], None],
        settings: OrchestratorSettings,
    ) -> None:
        self.membership = membership
        self.store = store
        self.metrics = metrics
        self.send = send
        self.publish = publish
        self.settings = settings
        self.job: JobRecord | None = None
        self.health: HealthBook | None = None
        self._generation_store = None

    # ------------------------------------------------------------------ inputs

    def submit(self, spec: JobSpec, now_s: float, job_id: str | None = None) -> str:
        if self.job is not None and not self.job.ended:
            raise JobRejected(f"job {self.job.job_id} is still {self.job.state.value}; one job at a time")
        job_id = job_id or f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", job_id):
            raise JobRejected(f"job id {job_id!r} may hold only letters, digits, '.', '_' and '-'")
        run_dir = os.path.abspath(os.path.join(self.settings.run_root, job_id))
        os.makedirs(run_dir, exist_ok=True)
        self.job = JobRecord(job_id, spec, run_dir, submitted_s=now_s)
        self.health = HealthBook(spec.health.settings())
        log.info("job %s submitted: %d nodes, %d cards", job_id, len(spec.cluster.nodes), spec.cluster.card_count)
        self._save_job()
        self._try_start(now_s)
        self._publish()
        return job_id

    def on_register(self, node: NodeRecord, now_s: float) -> None:
        self._update_membership_metrics()
        if self.job is None:
            return
        self._try_start(now_s)
        self._grow(node, now_s)
        self._publish()

    def _grow(self, node: NodeRecord, now_s: float) -> None:
        """A node of the job that registers while it trains without it (a lost node's agent came
        back, or a node started late) joins at the next checkpoint: scale up without losing a step.
        Cards evicted for a hardware fault stay out; cards lost with their node come back."""
        job, gen = self.job, self.job.generation
        in_job = node.name in {n.name for n in job.spec.cluster.nodes}
        if job.state is not JobState.RUNNING or gen is None or gen.ended or node.name in gen.nodes or not in_job:
            return
        for card in node.cards:
            ref = CardRef(node.name, card.index)
            if job.evicted.get(ref, "").startswith(f"node {node.name} lost"):
                del job.evicted[ref]
        usable = [c for c in node.cards if CardRef(node.name, c.index) not in job.evicted]
        if usable:
            why = f"node {node.name} joined with {len(usable)} usable cards"
            self._act([Verdict(VerdictKind.JOIN, CardRef(node.name, usable[0].index), why)], now_s)

    def on_step(self, node: str, report: pb.StepReport, now_s: float) -> None:
        gen = self._current_generation(report.generation)
        if gen is None:
            self.metrics.stale_reports_total.inc()
            return
        job = self.job
        gen.steps_by_rank[report.rank] = report.step
        gen.last_progress_s = now_s
        gen.last_report[report.rank] = report
        self.metrics.rank_step_time_seconds.labels(rank=str(report.rank), node=node).set(report.step_time_s)
        for part, seconds in (("compute", report.compute_time_s), ("comm_wait", report.comm_wait_s), ("bubble", report.bubble_s)):
            self.metrics.rank_time_seconds.labels(rank=str(report.rank), node=node, part=part).set(seconds)
        if gen.state is GenState.STARTING and len(gen.steps_by_rank) == gen.world_size:
            # The hang clock starts once every rank has trained a step (start-up is the rendezvous' job).
            gen.transition(GenState.RUNNING)
        self.health.record_step(report.rank, report.step, report.nonfinite_grads)
        slot = gen.slot(report.rank)
        # Per unit of work, so a stage given more layers by design does not read as a slow card.
        work = slot.micro_batches * gen.layout.stage_share(report.rank)
        self.health.record_compute(CardRef(slot.node, slot.card_index), report.compute_time_s, work)
        if gen.drain_verdicts and report.checkpoint_step > gen.drain_after_step:
            # Commits are all-ranks: one rank seeing it committed means every rank finished that
            # step and its part is on disk, so nothing up to it will be trained again.
            job.step = max(job.step, report.checkpoint_step)
            self._recover(list(gen.drain_verdicts), now_s)
            return
        tally = job.tallies.setdefault(report.step, StepTally())
        tally.loss_times_tokens += report.loss * report.tokens
        tally.tokens += report.tokens
        tally.max_step_time_s = max(tally.max_step_time_s, report.step_time_s)
        tally.ranks.add(report.rank)
        if len(tally.ranks) == gen.world_size:
            self._complete_step(report.step, job.tallies.pop(report.step), now_s)
            suspects = self.health.corrupt_ranks(report.step)
            verdicts = [
                Verdict(VerdictKind.DRAIN, CardRef(gen.slot(r).node, gen.slot(r).card_index), why) for r, why in suspects.items()
            ]
            if not verdicts and not gen.drain_verdicts:
                verdicts = self._stragglers(gen)
            if verdicts:
                self._act(verdicts, now_s)

    def on_heartbeat(self, node: str, heartbeat: pb.Heartbeat, now_s: float) -> None:
        if self.health is None:
            return
        self.health.ingest_heartbeat(node, heartbeat, now_s)
        gen = self.job.generation
        if self.job.state is JobState.RUNNING and gen is not None and not gen.ended and gen.failing_since is None:
            cards = [CardRef(slot.node, slot.card_index) for slot in gen.ranks if slot.node == node]
            verdicts = self.health.card_verdicts(cards)
            if verdicts:
                self._act(verdicts, now_s)

    def on_progress(self, node: str, progress: pb.RankProgress, now_s: float) -> None:
        gen = self._current_generation(progress.generation)
        if gen is None:
            self.metrics.stale_reports_total.inc()
            return
        gen.reduce_entered[progress.rank] = progress.step
        gen.last_progress_s = now_s

    def on_worker_exit(self, node: str, exit_msg: pb.WorkerExit, now_s: float) -> None:
        gen = self._current_generation(exit_msg.generation)
        if gen is None:
            self.metrics.stale_reports_total.inc()
            return
        slot = gen.slot(exit_msg.rank)
        if exit_msg.exit_code == 0:
            self.metrics.worker_exits_total.labels(outcome="finished").inc()
            gen.exited_ok.add(exit_msg.rank)
            if len(gen.exited_ok) == gen.world_size:
                self._finish_job(now_s)
            return
        self.metrics.worker_exits_total.labels(outcome="failed").inc()
        if not self.job.spec.fault_tolerance.enabled:
            self._fail_job(describe_exit(slot, exit_msg))
            return
        reason = exit_msg.reason + (f" (log: {exit_msg.log_path})" if exit_msg.log_path else "")
        gen.failures.append(RankFailure(slot.rank, CardRef(slot.node, slot.card_index), exit_msg.exit_code, reason, now_s))
        # Decide after a short grace: the peers of a dead rank fail too, and we want the culprit.
        gen.failing_since = gen.failing_since if gen.failing_since is not None else now_s

    def on_node_lost(self, node: NodeRecord, now_s: float) -> None:
        self._update_membership_metrics()
        silent_s = now_s - node.last_heartbeat_s
        log.warning("node %s lost: no heartbeat for %.1f s", node.name, silent_s)
        gen = self.job.generation if self.job else None
        if gen is None or gen.ended or node.name not in gen.nodes:
            if self.job is not None:
                self._publish()
            return
        if not self.job.spec.fault_tolerance.enabled:
            self._fail_job(f"node {node.name} lost: no heartbeat for {silent_s:.1f} s")
            return
        self._recover(lost_node_verdicts(node.name, [c.index for c in node.cards], silent_s), now_s)

    def tick(self, now_s: float) -> None:
        job = self.job
        if job is None:
            return
        gen = job.generation
        if (
            job.state is JobState.RUNNING
            and gen is not None
            and not gen.ended
            and gen.failing_since is not None
            and now_s - gen.failing_since >= job.spec.fault_tolerance.failure_grace_s
        ):
            self._recover(gen.drain_verdicts + self._blame(gen, now_s), now_s)
            return
        if job.state is JobState.RUNNING and gen is not None and gen.drain_verdicts and now_s > gen.drain_deadline_s:
            log.warning("drain checkpoint did not commit in time; leaving without it")
            self._recover(list(gen.drain_verdicts), now_s)
            return
        if job.state is JobState.RUNNING and gen is not None and gen.state is GenState.RUNNING:
            self._check_hang(gen, now_s)
            return
        if job.state is not JobState.PENDING:
            return
        waited_s = now_s - job.submitted_s
        if waited_s > job.spec.runtime.node_wait_timeout_s:
            missing = self.membership.missing([n.name for n in job.spec.cluster.nodes])
            self._fail_job(f"nodes {', '.join(missing)} did not register within {waited_s:.0f} s")

    # ------------------------------------------------------------------ mechanism

    def _check_hang(self, gen: Generation, now_s: float) -> None:
        silent_s = now_s - gen.last_progress_s
        if silent_s <= self.job.spec.fault_tolerance.hang_timeout_s:
            return
        ranks = hung_ranks(gen.steps_by_rank, gen.reduce_entered, gen.world_size)
        if ranks is None:
            # Nobody to single out: restart the generation on the same cards.
            log.warning("generation %d stuck for %.1f s with every rank at the same point", gen.number, silent_s)
            self._recover([], now_s)
            return
        verdicts = []
        for rank in ranks:
            slot = gen.slot(rank)
            reason = describe_hang(rank, gen.steps_by_rank.get(rank, 0), silent_s)
            verdicts.append(Verdict(VerdictKind.EVICT, CardRef(slot.node, slot.card_index), reason))
        self._recover(verdicts, now_s)

    def _blame(self, gen: Generation, now_s: float) -> list[Verdict]:
        """Who failed: a node whose agent's stream closed took its ranks with it (the ranks on other
        nodes only saw their peers vanish); otherwise the ranks that did not die of a peer's failure."""
        gone = [n for n in gen.nodes if n in self.membership.nodes and not self.membership.nodes[n].connected]
        if gone:
            verdicts = []
            for name in gone:
                node = self.membership.nodes[name]
                node.alive = False  # do not plan on it until its agent registers again
                reason = f"node {name} lost: its agent's stream closed"
                verdicts += [Verdict(VerdictKind.EVICT, CardRef(name, c.index), reason) for c in node.cards]
            return verdicts
        return blame_exits(gen.failures)

    def _stragglers(self, gen: Generation) -> list[Verdict]:
        cards = {CardRef(s.node, s.card_index): s for s in gen.ranks}
        believed = {card: self.job.measured_speed.get(card, slot.speed) for card, slot in cards.items()}
        return self.health.stragglers({card: slot.card_type for card, slot in cards.items()}, believed)

    def _act(self, verdicts: list[Verdict], now_s: float) -> None:
        """Carries out verdicts: an eviction at once; a drain after a checkpoint taken now has
        committed, so the card leaves without losing a step."""
        job = self.job
        if not job.spec.fault_tolerance.enabled:
            self._fail_job("; ".join(f"{v.card}: {v.reason}" for v in verdicts))
            return
        gen = job.generation
        drains = [v for v in verdicts if v.kind in (VerdictKind.DRAIN, VerdictKind.REPLAN, VerdictKind.JOIN)]
        if len(drains) < len(verdicts) or not job.spec.checkpoint.enabled or gen.state is not GenState.RUNNING:
            self._recover(gen.drain_verdicts + verdicts, now_s)
            return
        already = {v.card for v in gen.drain_verdicts}
        fresh = [v for v in drains if v.card not in already]
        if not fresh:
            return
        if not gen.drain_verdicts:
            gen.drain_after_step = job.step
            gen.drain_deadline_s = now_s + job.spec.fault_tolerance.drain_timeout_s
            reason = "; ".join(f"{v.card}: {v.reason}" for v in fresh)
            log.warning("draining %s: checkpoint first", reason)
            for node in gen.nodes:
                self.send(node, pb.CoordinatorCommand(checkpoint_now=pb.CheckpointNow(generation=gen.number, reason=reason)))
        gen.drain_verdicts.extend(fresh)

    def drain_node(self, node: str, reason: str, now_s: float) -> str:
        """A planned leave: the node's cards leave after a checkpoint, and are not used again."""
        job = self.job
        if node not in self.membership.nodes:
            raise JobRejected(f"no node {node!r}; known: {', '.join(sorted(self.membership.nodes)) or 'none'}")
        cards = [CardRef(node, card.index) for card in self.membership.nodes[node].cards]
        why = f"drained by request: {reason}" if reason else "drained by request"
        gen = job.generation if job else None
        if job is None or job.ended or gen is None or gen.ended or node not in gen.nodes:
            if job is not None:
                job.evicted.update({card: why for card in cards})
            return f"node {node} will not be used by this job"
        self._act([Verdict(VerdictKind.DRAIN, card, why) for card in cards], now_s)
        return f"draining node {node}: checkpoint, then continue without its {len(cards)} cards"

    def _recover(self, verdicts: list[Verdict], now_s: float) -> None:
        """Evicts the cards the verdicts name, ends the generation, starts the next without them."""
        job = self.job
        for verdict in verdicts:
            if verdict.kind is VerdictKind.REPLAN:
                job.measured_speed[verdict.card] = verdict.speed  # stays in the job, planned for
            elif verdict.kind is not VerdictKind.JOIN:
                job.evicted[verdict.card] = verdict.reason
            self.health.forget(verdict.card)
            self.metrics.evictions_total.labels(verdict=verdict.kind.value).inc()
            log.warning("%s %s: %s", verdict.kind.value, verdict.card, verdict.reason)
        reason = "; ".join(f"{v.card}: {v.reason}" for v in verdicts) or "generation stuck; restarting it"
        job.incidents.append(
            pb.Incident(
                detected_at_s=now_s - job.submitted_s,
                cards=[str(v.card) for v in verdicts],
                verdict=verdicts[0].kind.value if verdicts else "restart",
                reason=reason,
                generation=job.generation.number,
                step_at_failure=job.step,
                last_step_before_s=job.last_step_s - job.submitted_s,
            )
        )
        self._end_generation(GenState.FAILED, reason)
        job.step_at_failure = job.step
        if job.generations_started >= job.spec.fault_tolerance.max_generations:
            self._fail_job(f"{reason}; gave up after {job.generations_started} generations")
            return
        try:
            ranks = plan_ranks(job.spec, self.membership, set(job.evicted), job.measured_speed)
        except ValueError as error:
            self._fail_job(f"{reason}; {error}")
            return
        if not ranks.slots:
            self._fail_job(f"{reason}; no usable card is left")
            return
        job.tallies.clear()
        self.health.new_generation()
        self._start_generation(job, ranks)
        self._publish()

    def _current_generation(self, number: int) -> Generation | None:
        """The running generation if `number` names it; reports from older ones are fenced off."""
        gen = self.job.generation if self.job else None
        if gen is None or gen.number != number or gen.ended:
            return None
        return gen

    def _try_start(self, now_s: float) -> None:
        job = self.job
        if job.state is not JobState.PENDING:
            return
        names = [n.name for n in job.spec.cluster.nodes]
        if not self.membership.alive(names):
            return
        try:
            ranks = plan_ranks(job.spec, self.membership)
        except ValueError as error:
            self._fail_job(str(error))
            return
        self._start_generation(job, ranks)

    def _start_generation(self, job: JobRecord, plan: RankPlan) -> None:
        from hyrun.runtime.coordinator.rendezvous import GenerationStore

        job.generations_started += 1
        slots, layout = plan.slots, plan.layout
        gen = Generation(job.generations_started, slots, layout)
        job.generation = gen
        job.state = JobState.RUNNING
        self._generation_store = GenerationStore(
            self.settings.bind_host, self.settings.advertise_host, job.job_id, gen.number, gen.world_size
        )
        info = self._generation_store.info
        backend = job.spec.runtime.backend
        rendezvous = pb.Rendezvous(
            store_host=info.host,
            store_port=info.port,
            key_prefix=info.key_prefix,
            world_size=info.world_size,
            backend=backend,
        )
        job_json = job.spec.to_json()
        for node in gen.nodes:
            ranks = [
                pb.RankAssignment(
                    rank=s.rank,
                    card_index=s.card_index,
                    speed=s.speed,
                    micro_batches=s.micro_batches,
                    micro_batch_offset=layout.micro_batch_offset(s.rank),
                    node=s.node,
                )
                for s in slots
                if s.node == node
            ]
            start = pb.StartGeneration(
                generation=gen.number, rendezvous=rendezvous, ranks=ranks, job_json=job_json, run_dir=job.run_dir,
                layout_json=layout.to_json(),
            )
            self.send(node, pb.CoordinatorCommand(start=start))
        self.metrics.generation.set(gen.number)
        log.info("generation %d started: %d ranks on %s (%s)", gen.number, gen.world_size, ", ".join(gen.nodes),
                 layout.describe())
        self.store.put(
            f"jobs/{job.job_id}/generations/{gen.number}",
            {"ranks": [slot.__dict__ for slot in slots], "layout": json.loads(layout.to_json()),
             "rendezvous_port": info.port},
        )
        self._save_job()

    def _complete_step(self, step: int, tally: StepTally, now_s: float) -> None:
        job = self.job
        job.last_step_s = now_s
        if job.step_at_failure is not None:
            # First step of a resumed generation: everything past its checkpoint is trained again.
            lost = max(0, job.step_at_failure - (step - 1))
            job.steps_lost += lost
            incident = job.incidents[-1]
            incident.resumed_at_s, incident.resumed_step, incident.steps_lost = now_s - job.submitted_s, step, lost
            self.metrics.steps_lost_total.inc(lost)
            job.step_at_failure = None
        job.step = step
        job.loss = tally.loss_times_tokens / max(tally.tokens, 1)
        job.step_time_s = tally.max_step_time_s
        job.tokens_per_s = tally.tokens / tally.max_step_time_s if tally.max_step_time_s > 0 else 0.0
        self.metrics.step.set(job.step)
        self.metrics.loss.set(job.loss)
        self.metrics.tokens_per_second.set(job.tokens_per_s)
        # The store is written on every state change but at most once a second for progress:
        # a slow etcd must not stall the event loop that also takes heartbeats.
        if now_s - job.saved_s >= 1.0:
            self._save_job()
        self._publish()

    def _end_generation(self, state: GenState, reason: str) -> None:
        gen = self.job.generation
        if gen is None or gen.ended:
            return
        if state is GenState.FAILED:
            gen.transition(GenState.STOPPING, reason)
            for node in gen.nodes:
                if node in self.membership.nodes and self.membership.nodes[node].connected:
                    self.send(node, pb.CoordinatorCommand(stop=pb.StopGeneration(generation=gen.number, reason=reason)))
        gen.transition(state, reason)
        if self._generation_store is not None:
            self._generation_store.close()
            self._generation_store = None

    def _finish_job(self, now_s: float) -> None:
        job = self.job
        self._end_generation(GenState.COMPLETED, "every rank finished")
        job.state = JobState.COMPLETED
        job.message = f"trained {job.step} steps in {now_s - job.submitted_s:.1f} s"
        log.info("job %s completed: %s", job.job_id, job.message)
        self._save_job()
        self._publish()

    def _fail_job(self, reason: str) -> None:
        job = self.job
        if job is None or job.ended:
            return
        self._end_generation(GenState.FAILED, reason)
        job.state = JobState.FAILED
        job.message = reason
        self.metrics.job_failures_total.inc()
        log.error("job %s failed: %s", job.job_id, reason)
        self._save_job()
        self._publish()

    # ------------------------------------------------------------------ views

    def _update_membership_metrics(self) -> None:
        alive = [n for n in self.membership.nodes.values() if n.alive]
        self.metrics.nodes_alive.set(len(alive))
        self.metrics.cards.set(sum(len(n.cards) for n in alive))

    def _save_job(self) -> None:
        job = self.job
        job.saved_s = job.last_step_s
        self.store.put(
            f"jobs/{job.job_id}",
            {
                "state": job.state.value,
                "generation": job.generation.number if job.generation else 0,
                "step": job.step,
                "message": job.message,
                "run_dir": job.run_dir,
                "spec": job.spec.model_dump(mode="json"),
            },
        )

    def node_states(self) -> list[pb.NodeState]:
        gen = self.job.generation if self.job else None
        training = set(gen.nodes) if gen is not None and not gen.ended else set()
        states = []
        for node in self.membership.nodes.values():
            state = "lost" if not node.alive else "training" if node.name in training else "idle"
            states.append(pb.NodeState(node=node.name, alive=node.alive, cards=len(node.cards), state=state))
        return states

    def event(self) -> pb.JobEvent:
        job = self.job
        return pb.JobEvent(
            job_id=job.job_id,
            state=job.state.value,
            generation=job.generation.number if job.generation else 0,
            step=job.step,
            total_steps=job.spec.training.steps,
            loss=job.loss,
            tokens_per_s=job.tokens_per_s,
            step_time_s=job.step_time_s,
            nodes=self.node_states(),
            message=job.message,
            evictions=[f"{card}: {reason}" for card, reason in job.evicted.items()],
            steps_lost=job.steps_lost,
            incidents=job.incidents,
            ranks=self._rank_states(),
            layout=job.generation.layout.describe() if job.generation else "",
        )

    def _rank_states(self) -> list[pb.RankState]:
        gen = self.job.generation if self.job else None
        if gen is None:
            return []
        states = []
        for slot in gen.ranks:
            report = gen.last_report.get(slot.rank)
            states.append(
                pb.RankState(
                    rank=slot.rank, node=slot.node, card_index=slot.card_index, micro_batches=slot.micro_batches,
                    compute_time_s=report.compute_time_s if report else 0.0,
                    step_time_s=report.step_time_s if report else 0.0,
                    step=report.step if report else 0,
                    comm_wait_s=report.comm_wait_s if report else 0.0,
                    bubble_s=report.bubble_s if report else 0.0,
                )
            )  # fmt: skip
        return states

    def _publish(self) -> None:
        if self.job is not None:
            self.publish(self.event())
