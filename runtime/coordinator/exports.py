"""What the coordinator's inputs and actions add to its Prometheus series (runtime/metrics.py):
per-rank gradients, checkpoints, recoveries, planning. Ingest and the orchestrator call these on
the event loop; nothing here decides anything."""

from __future__ import annotations

import math

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import Recover
from hyrun.runtime.coordinator.evaluations import EvalBook
from hyrun.runtime.coordinator.records import JobRecord, StepTally
from hyrun.runtime.data.spec import ValidationSpec
from hyrun.runtime.metrics import CoordinatorMetrics, checkpoint_failure_cause

_STALL_FLOOR_S = 0.001  # a step that did not save still pays a fence of microseconds: not a save's stall
_RESUME_SOURCES = {"shared_memory": "ram", "disk": "disk"}


class JobExports:
    """One job's metric bookkeeping: the newest commit seen and each rank's failed-save count."""

    def __init__(self, metrics: CoordinatorMetrics, job: JobRecord) -> None:
        self.metrics = metrics
        self.job = job
        self.newest_commit = -1
        self._failures_seen: dict[int, int] = {}  # rank -> saves failed, in the running generation
        validation = job.spec.data.validation if job.spec.data is not None else ValidationSpec()
        metrics.eval_regression_margin_ratio.set(validation.regression_margin)

    def step_report(self, node: str, report: pb.StepReport, now_s: float) -> None:
        m, rank = self.metrics, str(report.rank)
        m.rank_step_time_seconds.labels(rank=rank, node=node).set(report.step_time_s)
        for part, seconds in (("compute", report.compute_time_s), ("comm_wait", report.comm_wait_s), ("bubble", report.bubble_s)):
            m.rank_time_seconds.labels(rank=rank, node=node, part=part).set(seconds)
        m.rank_grad_norm.labels(rank=rank, node=node).set(report.grad_norm)
        for kind, moved in report.collective_bytes.items():
            m.rank_collective_bytes_total.labels(rank=rank, node=node, kind=kind).inc(moved)
        for kind, seconds in report.collective_s.items():
            m.rank_collective_seconds_total.labels(rank=rank, node=node, kind=kind).inc(seconds)
        if report.nonfinite_grads > 0:
            m.rank_nonfinite_grad_steps_total.labels(rank=rank, node=node).inc()
        if report.checkpoint_stall_s >= _STALL_FLOOR_S:
            m.checkpoint_stall_seconds.observe(report.checkpoint_stall_s)
        if report.resume_source:
            m.checkpoint_resumes_total.labels(source=_RESUME_SOURCES.get(report.resume_source, report.resume_source)).inc()
            m.checkpoint_resume_fallbacks_total.inc(report.resume_fallbacks)
        if report.rank == 0:
            # A save commits or fails on every rank alike (commit.py): rank 0 speaks for all of them.
            self._checkpoint_news(report, now_s)

    def _checkpoint_news(self, report: pb.StepReport, now_s: float) -> None:
        m = self.metrics
        failed_before = self._failures_seen.get(report.rank, 0)
        if report.checkpoint_failures > failed_before:
            m.checkpoint_failures_total.labels(cause=checkpoint_failure_cause(report.checkpoint_error)).inc(
                report.checkpoint_failures - failed_before
            )
        self._failures_seen[report.rank] = report.checkpoint_failures
        if report.checkpoint_bytes:
            m.checkpoint_size_bytes.set(report.checkpoint_bytes)
        if report.checkpoint_step > self.newest_commit:
            # Status fields come from one snapshot of the checkpointer: this time is this commit's.
            if report.checkpoint_persist_s > 0:
                m.checkpoint_durable_seconds.observe(report.checkpoint_persist_s)
            m.note_checkpoint_commit(now_s)
            self.newest_commit = report.checkpoint_step
            m.checkpoint_last_committed_step.set(report.checkpoint_step)

    def step_completed(self, tally: StepTally, resumed: pb.Incident | None) -> None:
        m, job = self.metrics, self.job
        m.step.set(job.step)
        m.last_progress_timestamp.set_to_current_time()
        m.loss.set(job.loss)
        m.tokens_per_second.set(job.tokens_per_s)
        m.step_time_seconds.set(job.step_time_s)
        if tally.nonfinite:
            m.steps_skipped_total.inc()
        checkpoint = job.spec.checkpoint
        if not checkpoint.enabled:
            interval_s = math.nan
        elif checkpoint.interval_s > 0:
            interval_s = checkpoint.interval_s
        else:
            interval_s = checkpoint.interval_steps * job.step_time_s if checkpoint.interval_steps > 0 else math.nan
        m.checkpoint_interval_seconds.set(interval_s)
        if resumed is not None:
            m.steps_lost_total.labels(verdict=resumed.verdict).inc(resumed.steps_lost)
            m.recovery_resume_seconds.labels(verdict=resumed.verdict).observe(resumed.resumed_at_s - resumed.detected_at_s)

    def generation_started(self, number: int, slots, predicted_step_time_s: float | None, now_s: float) -> None:
        m = self.metrics
        m.clear_ranks()
        for slot in slots:  # at 0 before the first step, so increase() sees a first-step overflow
            m.rank_nonfinite_grad_steps_total.labels(rank=str(slot.rank), node=slot.node)
        self._failures_seen.clear()
        m.generation.set(number)
        m.job_running.set(1)
        if number == 1:
            m.last_progress_timestamp.set_to_current_time()
        m.planner_predicted_step_time_seconds.set(math.nan if predicted_step_time_s is None else predicted_step_time_s)
        if number == 1 and self.newest_commit < 0:
            m.note_checkpoint_commit(now_s)  # no checkpoint yet: its age counts from the start of training

    def recovering(self, action: Recover, incident: pb.Incident, now_s: float) -> None:
        m = self.metrics
        for verdict in action.verdicts:
            m.evictions_total.labels(
                verdict=verdict.kind.value, cause=verdict.evidence.cause.value, node=verdict.card.node, card=str(verdict.card.index)
            ).inc()
        # From the last step every rank completed (or the generation's start, if none did).
        since_s = max(self.job.last_step_s, self.job.generation.started_s if self.job.generation else 0.0)
        m.recovery_detection_seconds.labels(verdict=incident.verdict).observe(max(0.0, now_s - since_s))
        cause = action.evidence[0].cause.value if action.evidence else "restart"
        m.replans_total.labels(cause=cause).inc()

    def job_ended(self) -> None:
        self.metrics.job_running.set(0)

    def evaluated(self, book: EvalBook, report: pb.EvalReport) -> None:
        """The newest two scored checkpoints, as the book now holds them (an older checkpoint scored
        late changes at most the previous one), and the evaluation's cost or failure."""
        m = self.metrics
        m.eval_duration_seconds.observe(report.duration_s)
        if report.error:
            m.eval_failures_total.inc()
            return
        newest, previous = book.newest, book.previous
        for family in (m.eval_loss, m.eval_perplexity, m.eval_previous_loss, m.eval_task_score):
            family.clear()
        m.eval_checkpoint_step.set(newest.step)
        for source, loss in newest.loss.items():
            m.eval_loss.labels(source=source).set(loss)
            m.eval_perplexity.labels(source=source).set(newest.perplexity[source])
        for (task, metric), value in newest.task_scores.items():
            m.eval_task_score.labels(task=task, metric=metric).set(value)
        for source, loss in (previous.loss.items() if previous is not None else ()):
            m.eval_previous_loss.labels(source=source).set(loss)
