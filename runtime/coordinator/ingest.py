"""The coordinator's inputs: job submission and the agents' messages update state (the job record,
its generation, card health, membership metrics) and nothing else — no verdict is reached here.
The orchestrator (its subclass) decides on a timer and applies the decisions."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.evaluations import check_report
from hyrun.runtime.coordinator.exports import JobExports
from hyrun.runtime.coordinator.generation import Generation
from hyrun.runtime.coordinator.health import HealthBook
from hyrun.runtime.coordinator.membership import Membership, NodeRecord
from hyrun.runtime.coordinator.persist import JOBS_PREFIX, job_document, job_key, newest, restore_job
from hyrun.runtime.coordinator.policy import RankFailure
from hyrun.runtime.coordinator.records import JobRecord, StepTally, decide_settings
from hyrun.runtime.coordinator.status import job_event, node_states
from hyrun.runtime.coordinator.store_writer import StoreWriter
from hyrun.runtime.coordinator.view import DecideSettings
from hyrun.runtime.jobfile import JobSpec, new_job_id, valid_job_id
from hyrun.runtime.metrics import CoordinatorMetrics

log = logging.getLogger("hyrun.coordinator")


class JobRejected(ValueError):
    """A submission the coordinator cannot take (another job running, nodes unknown...)."""


class JobIngest:
    def __init__(
        self,
        *,
        membership: Membership,
        writer: StoreWriter,
        metrics: CoordinatorMetrics,
        publish: Callable[[pb.JobEvent], None],
        run_root: str,
        heartbeat_timeout_s: float,
    ) -> None:
        self.membership = membership
        self.writer = writer
        self.metrics = metrics
        self.publish = publish
        self.run_root = run_root
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.job: JobRecord | None = None
        self.decide_settings: DecideSettings | None = None
        self.health: HealthBook | None = None
        self.exports: JobExports | None = None

    def submit(self, spec: JobSpec, now_s: float, job_id: str | None = None) -> str:
        if self.job is not None and job_id == self.job.job_id:
            return job_id  # a launcher that lost the reply (a coordinator failover) submits again
        if self.job is not None and not self.job.ended:
            raise JobRejected(f"job {self.job.job_id} is still {self.job.state.value}; one job at a time")
        job_id = job_id or new_job_id(spec.name)
        if not valid_job_id(job_id):
            raise JobRejected(f"job id {job_id!r} may hold only letters, digits, '.', '_' and '-'")
        run_dir = os.path.abspath(os.path.join(self.run_root, job_id))
        os.makedirs(run_dir, exist_ok=True)
        self._take(JobRecord(job_id, spec, run_dir, submitted_s=now_s))
        log.info("job %s submitted: %d nodes, %d cards", job_id, len(spec.cluster.nodes), spec.cluster.card_count)
        self._save_job()
        self._publish()
        return job_id

    def _take(self, job: JobRecord) -> None:
        self.job = job
        self.decide_settings = decide_settings(job.spec, self.heartbeat_timeout_s)  # fixed for the job's life
        self.health = HealthBook(job.spec.health)
        self.exports = JobExports(self.metrics, job)
        self.metrics.cards_health.fatal_xids = frozenset(job.spec.health.fatal_xids)

    def restore(self, documents: dict[str, dict], now_s: float) -> str | None:
        """Takes on the newest job among the stored `documents` (a coordinator that took over, or
        restarted): carries it on unless it has ended; returns its id, or None when there is none."""
        doc = newest({k: v for k, v in documents.items() if k.startswith(JOBS_PREFIX)})
        if doc is None:
            return None
        job, nodes = restore_job(doc, now_s)
        self._take(job)
        if job.ended:
            log.info("the newest stored job, %s, has %s: kept for its launcher to read", job.job_id, job.state.value.lower())
            return job.job_id
        for node in nodes:
            self.membership.register(node)
        gen = job.generation
        log.warning("carrying on job %s at step %d: %s", job.job_id, job.step,
                    f"generation {gen.number} on {', '.join(gen.nodes)}, waiting for its agents" if gen else "no generation running")
        return job.job_id

    def on_register(self, node: NodeRecord, now_s: float) -> None:
        self.metrics.cards_health.register_node(node.name, [(c.index, c.type, c.memory_bytes) for c in node.cards], now_s)
        self._update_membership_metrics()
        self._publish()

    def on_heartbeat(self, node: str, heartbeat: pb.Heartbeat, now_s: float) -> None:
        self.metrics.cards_health.ingest(node, heartbeat.cards, now_s, heartbeat.sequence)
        if self.health is not None:
            self.health.ingest_heartbeat(node, heartbeat, now_s)

    def on_step(self, node: str, report: pb.StepReport, now_s: float) -> None:
        gen = self._current_generation(report.generation)
        if gen is None:
            return
        failed_before = gen.saves_failed
        gen.record_step(report, now_s)
        if gen.saves_failed > failed_before:
            self.job.record_failed_save(report.checkpoint_error, gen.number, now_s)
            self._publish()
        self.exports.step_report(node, report, now_s)
        self.health.record_step(report.rank, report.step, report.nonfinite_grads)
        slot = gen.slot(report.rank)
        # Per unit of work, so a stage given more layers by design does not read as a slow card.
        self.health.record_compute(slot.card, report.compute_time_s, slot.micro_batches * gen.layout.stage_share(report.rank))
        tally = self.job.tally(report, gen.world_size)
        if tally is not None:
            self._complete_step(report.step, tally, now_s)

    def on_progress(self, node: str, progress: pb.RankProgress, now_s: float) -> None:
        gen = self._current_generation(progress.generation)
        if gen is not None:
            gen.reduce_entered[progress.rank] = progress.step
            gen.last_progress_s = now_s

    def on_worker_started(self, node: str, started: pb.WorkerStarted) -> None:
        gen = self._current_generation(started.generation)
        if gen is not None:
            gen.worker_pids[started.rank] = started.pid

    def worker_pid(self, node: str, card: int) -> int | None:
        """The pid of the running generation's worker on this card, if one runs there."""
        gen = self.job.generation if self.job else None
        if gen is None or gen.ended:
            return None
        rank = next((s.rank for s in gen.ranks if s.node == node and s.card_index == card), None)
        return None if rank is None else gen.worker_pids.get(rank)

    def on_worker_exit(self, node: str, exit_msg: pb.WorkerExit, now_s: float) -> None:
        gen = self._current_generation(exit_msg.generation)
        if gen is None:
            return
        if exit_msg.exit_code == 0:
            self.metrics.worker_exits_total.labels(outcome="finished").inc()
            gen.exited_ok.add(exit_msg.rank)
            return
        self.metrics.worker_exits_total.labels(outcome="failed").inc()
        slot = gen.slot(exit_msg.rank)
        gen.record_failure(
            RankFailure(slot.rank, slot.card, slot.card_type, exit_msg.exit_code, exit_msg.reason, now_s, exit_msg.log_path)
        )

    def on_eval(self, report: pb.EvalReport) -> None:
        """A checkpoint scored beside training (or an evaluation that failed): exported, and shown
        in the job's events. Raises EvalRejected for another job or names that cannot be labels."""
        check_report(report, self.job.job_id if self.job is not None else None)
        if report.error:
            log.warning("job %s: evaluation of step %d failed: %s", report.job_id, report.step, report.error[:500])
        self.job.evals.add(report)
        self.exports.evaluated(self.job.evals, report)
        self._publish()

    def _current_generation(self, number: int) -> Generation | None:
        """The running generation if `number` names it; reports from older ones are fenced off."""
        gen = self.job.generation if self.job else None
        if gen is None or gen.number != number or gen.ended:
            self.metrics.stale_reports_total.inc()
            return None
        return gen

    def _complete_step(self, step: int, tally: StepTally, now_s: float) -> None:
        job = self.job
        resuming = job.step_at_failure is not None
        job.complete_step(step, tally, now_s)
        self.exports.step_completed(tally, job.resuming_incident() if resuming else None)
        # The store is written on every state change but at most once a second for progress:
        # a slow etcd must not stall the event loop that also takes heartbeats.
        if now_s - job.saved_s >= 1.0:
            self._save_job()
        self._publish()

    # ------------------------------------------------------------------ views

    def _update_membership_metrics(self) -> None:
        alive = [n for n in self.membership.nodes.values() if n.alive]
        self.metrics.nodes_alive.set(len(alive))
        self.metrics.cards.set(sum(len(n.cards) for n in alive))

    def _save_job(self) -> int:
        """Hands the job's document to the store writer; returns its ticket (to wait for it)."""
        self.job.saved_s = self.job.last_step_s
        document = job_document(self.job, self.membership.nodes, time.monotonic(), time.time())
        return self.writer.write(job_key(self.job.job_id), document)

    def node_states(self) -> list[pb.NodeState]:
        return node_states(self.job, self.membership)

    def event(self) -> pb.JobEvent:
        return job_event(self.job, self.membership)

    def _publish(self) -> None:
        if self.job is not None:
            self.publish(self.event())
