"""The coordinator's Prometheus metrics. One registry per coordinator (tests run several in one
process), served over HTTP by prometheus-client. Names follow Prometheus conventions: base units,
`_total` for counters, labels for the dimension rather than one metric per rank. Per-card series
come from `card_metrics.CardCollector`, made at scrape time and bounded in number. Every family is
listed, with what sets it, in README's Monitoring section."""

from __future__ import annotations

import math
import re
import time
from collections import deque
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hyrun.runtime.card_metrics import CARD_SERIES_LIMIT, CardCollector

VERDICTS = ("evict", "drain", "replan", "join", "restart")  # actions.VerdictKind, and "restart" (a stuck generation)
RESUME_SOURCES = ("ram", "disk")
CHECKPOINT_FAILURE_CAUSES = ("no_space", "permission", "timeout", "peer", "internal", "io", "other")
RECOVERY_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
LOOP_LAG_WINDOW_S = 15.0  # the loop-lag gauge is the worst lag of this window: a 15 s scrape misses no stall

_FAILURE_PATTERNS = (
    ("no_space", r"no space|ENOSPC|disk quota"),
    ("permission", r"permission denied|EACCES|read-only file system|EROFS"),
    ("timeout", r"timed? ?out|deadline"),
    ("internal", r"internal error"),
    ("peer", r"connection (reset|refused|closed)|by peer"),
    ("io", r"OSError|IOError|I/O error|CheckpointException|No such file"),
)


def checkpoint_failure_cause(error: str) -> str:
    """A failed save's error text as one of CHECKPOINT_FAILURE_CAUSES: a bounded label, never the text."""
    for cause, pattern in _FAILURE_PATTERNS:
        if re.search(pattern, error, re.IGNORECASE):
            return cause
    return "other"


class CoordinatorMetrics:
    def __init__(self, card_series_limit: int = CARD_SERIES_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: the coordinator's (its now_s values), read when a scrape asks for the checkpoint's age."""
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.nodes_alive = Gauge("hyrun_nodes_alive", "Nodes whose agent heartbeats are current", registry=r)
        self.cards = Gauge("hyrun_cards", "Cards registered by live nodes", registry=r)
        self.generation = Gauge("hyrun_generation", "Number of the current generation", registry=r)
        self.step = Gauge("hyrun_step", "Last optimizer step completed by every rank", registry=r)
        self.loss = Gauge("hyrun_loss", "Training loss of the last completed step", registry=r)
        self.tokens_per_second = Gauge("hyrun_tokens_per_second", "Training throughput", registry=r)
        self.rank_step_time_seconds = Gauge(
            "hyrun_rank_step_time_seconds", "Last step time per rank", ["rank", "node"], registry=r
        )
        self.rank_time_seconds = Gauge(
            "hyrun_rank_time_seconds", "Where a rank's last step went: compute, comm_wait or bubble",
            ["rank", "node", "part"], registry=r,
        )
        self.heartbeats_total = Counter("hyrun_heartbeats_total", "Agent heartbeats received", registry=r)
        self.worker_exits_total = Counter(
            "hyrun_worker_exits_total", "Worker exits by outcome", ["outcome"], registry=r
        )
        self.stale_reports_total = Counter(
            "hyrun_stale_reports_total", "Reports ignored because they named an older generation", registry=r
        )
        self.evictions_total = Counter(
            "hyrun_evictions_total",
            "Cards taken out of (or replanned within) a generation, by verdict and cause (bounded: one series per "
            "card the job ever acted on)", ["verdict", "cause", "node", "card"], registry=r,
        )
        self.steps_lost_total = Counter(
            "hyrun_steps_lost_total", "Steps trained again after resuming from a checkpoint, by the recovery's verdict",
            ["verdict"], registry=r,
        )
        self.job_failures_total = Counter("hyrun_job_failures_total", "Jobs ended by a failure", registry=r)
        self.loop_lag_seconds = Gauge(
            "hyrun_coordinator_loop_lag_seconds",
            f"How late the coordinator's policy timer ran: the worst lag of the last {LOOP_LAG_WINDOW_S:.0f} s",
            registry=r,
        )
        self._lags: deque[tuple[float, float]] = deque()
        # ---- the job
        self.job_running = Gauge("hyrun_job_running", "1 while a job is running, 0 otherwise", registry=r)
        self.last_progress_timestamp = Gauge(
            "hyrun_last_progress_timestamp_seconds",
            "Unix time of the job's last progress: a completed step, or else its first generation's start or "
            "this coordinator's (the stall alert's clock)", registry=r,
        )
        self.last_progress_timestamp.set_to_current_time()
        self.step_time_seconds = Gauge(
            "hyrun_step_time_seconds", "Wall time of the last completed step (its slowest rank)", registry=r
        )
        self.steps_skipped_total = Counter(
            "hyrun_steps_skipped_total",
            "Steps whose update every rank skipped because some rank's gradients were not finite", registry=r,
        )
        # ---- per rank (the running generation's ranks only: cleared when a generation starts)
        self.rank_collective_bytes_total = Counter(
            "hyrun_rank_collective_bytes_total", "Bytes a rank put into collectives, by kind", ["rank", "node", "kind"], registry=r
        )
        self.rank_collective_seconds_total = Counter(
            "hyrun_rank_collective_seconds_total", "Seconds a rank spent inside collective calls, by kind",
            ["rank", "node", "kind"], registry=r,
        )  # fmt: skip
        self.rank_grad_norm = Gauge(
            "hyrun_rank_grad_norm", "Norm of a rank's local gradients in its last step, before reduction",
            ["rank", "node"], registry=r,
        )
        self.rank_nonfinite_grad_steps_total = Counter(
            "hyrun_rank_nonfinite_grad_steps_total", "Steps in which a rank's local gradients held NaN or inf",
            ["rank", "node"], registry=r,
        )
        # ---- checkpoints
        self.checkpoint_stall_seconds = Histogram(
            "hyrun_checkpoint_stall_seconds", "Training time a rank's step lost to checkpointing (steps that saved)",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0), registry=r,
        )
        self.checkpoint_durable_seconds = Histogram(
            "hyrun_checkpoint_durable_seconds", "Time from a checkpoint's staging to its all-ranks commit on disk",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0), registry=r,
        )
        self.checkpoint_size_bytes = Gauge(
            "hyrun_checkpoint_size_bytes", "Size of the newest committed checkpoint, all ranks", registry=r
        )
        self.checkpoint_last_committed_step = Gauge(
            "hyrun_checkpoint_last_committed_step", "Step of the newest committed checkpoint", registry=r
        )
        self.checkpoint_age_seconds = Gauge(
            "hyrun_checkpoint_age_seconds",
            "Time since the newest checkpoint committed (since training started when none has)", registry=r,
        )
        self._age_since_s: float | None = None
        self.checkpoint_age_seconds.set_function(self._checkpoint_age)
        self.checkpoint_interval_seconds = Gauge(
            "hyrun_checkpoint_interval_seconds",
            "Expected time between checkpoints: the job's interval_s, or interval_steps x the last step time",
            registry=r,
        )
        self.checkpoint_failures_total = Counter(
            "hyrun_checkpoint_failures_total", "Checkpoint saves that failed (on every rank), by cause", ["cause"], registry=r
        )
        self.checkpoint_resumes_total = Counter(
            "hyrun_checkpoint_resumes_total", "Ranks that resumed from a checkpoint, by where it was read from",
            ["source"], registry=r,
        )
        self.checkpoint_resume_fallbacks_total = Counter(
            "hyrun_checkpoint_resume_fallbacks_total", "Newer checkpoints a resuming rank refused (damaged, unusable)",
            registry=r,
        )
        # ---- recoveries and planning
        self.recovery_detection_seconds = Histogram(
            "hyrun_recovery_detection_seconds",
            "From the last step every rank completed to the verdict that ended the generation", ["verdict"],
            buckets=RECOVERY_BUCKETS_S, registry=r,
        )
        self.recovery_resume_seconds = Histogram(
            "hyrun_recovery_resume_seconds", "From a verdict to the next generation's first completed step",
            ["verdict"], buckets=RECOVERY_BUCKETS_S, registry=r,
        )
        self.replans_total = Counter(
            "hyrun_replans_total", "Generations planned again after one ended, by the cause of the first verdict",
            ["cause"], registry=r,
        )
        self.planner_predicted_step_time_seconds = Gauge(
            "hyrun_planner_predicted_step_time_seconds",
            "The cost model's step time for the running generation's plan (NaN: no plan, an even split)", registry=r,
        )
        # ---- evaluation beside training (eval/watch.py reports each scored checkpoint: ReportEval)
        self.eval_loss = Gauge(
            "hyrun_eval_loss", "Held-out loss (nats/token) of the newest checkpoint scored, per source", ["source"],
            registry=r,
        )
        self.eval_perplexity = Gauge(
            "hyrun_eval_perplexity", "Held-out perplexity of the newest checkpoint scored, per source", ["source"],
            registry=r,
        )
        self.eval_previous_loss = Gauge(
            "hyrun_eval_previous_loss", "Held-out loss of the checkpoint scored before the newest, per source",
            ["source"], registry=r,
        )
        self.eval_checkpoint_step = Gauge(
            "hyrun_eval_checkpoint_step", "Step of the newest checkpoint the evaluation scored", registry=r
        )
        self.eval_task_score = Gauge(
            "hyrun_eval_task_score", "LM Evaluation Harness score of the newest checkpoint scored, per task and metric",
            ["task", "metric"], registry=r,
        )
        self.eval_regression_margin_ratio = Gauge(
            "hyrun_eval_regression_margin_ratio",
            "How much higher than the previous checkpoint's a held-out loss may be before HyrunEvalWorse fires "
            "(the job's data.validation.regression_margin)", registry=r,
        )
        self.eval_failures_total = Counter(
            "hyrun_eval_failures_total", "Checkpoint evaluations that failed (training went on)", registry=r
        )
        self.eval_duration_seconds = Histogram(
            "hyrun_eval_duration_seconds", "Time to evaluate one checkpoint, beside training",
            buckets=(1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0), registry=r,
        )
        self.cards_health = CardCollector(card_series_limit)
        r.register(self.cards_health)
        # Series with a known, bounded label set exist from the start at 0, so increase() sees the first event.
        for verdict in VERDICTS:
            self.steps_lost_total.labels(verdict=verdict)
            self.recovery_detection_seconds.labels(verdict=verdict)
            self.recovery_resume_seconds.labels(verdict=verdict)
        for cause in CHECKPOINT_FAILURE_CAUSES:
            self.checkpoint_failures_total.labels(cause=cause)
        for source in RESUME_SOURCES:
            self.checkpoint_resumes_total.labels(source=source)
        self.planner_predicted_step_time_seconds.set(math.nan)
        self._server = None

    def note_loop_lag(self, lag_s: float, now_s: float) -> None:
        """One policy tick's lateness; the gauge shows the worst of the last LOOP_LAG_WINDOW_S."""
        lags = self._lags
        while lags and (lags[0][0] <= now_s - LOOP_LAG_WINDOW_S or lags[0][1] <= lag_s):
            lags.popleft()
        while lags and lags[-1][1] <= lag_s:
            lags.pop()
        lags.append((now_s, lag_s))  # decreasing lags: the first is the window's worst
        self.loop_lag_seconds.set(lags[0][1])

    def note_checkpoint_commit(self, now_s: float | None = None) -> None:
        """A newer checkpoint committed (or training started with none): the age counts from now."""
        self._age_since_s = self.clock() if now_s is None else now_s

    def _checkpoint_age(self) -> float:
        return math.nan if self._age_since_s is None else self.clock() - self._age_since_s

    def clear_ranks(self) -> None:
        """A generation starts: the last one's ranks (its numbering, its nodes) are gone."""
        for family in (self.rank_step_time_seconds, self.rank_time_seconds, self.rank_grad_norm,
                       self.rank_nonfinite_grad_steps_total):  # fmt: skip
            family.clear()

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP server; returns the port it bound (port 0 picks one)."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
