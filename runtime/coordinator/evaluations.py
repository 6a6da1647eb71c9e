"""What the evaluation beside training reports (the ReportEval RPC, sent by eval/watch.py): each scored
checkpoint's held-out loss per source and its LM Evaluation Harness scores. The coordinator keeps the
two newest checkpoints' results, so the metrics show the newest beside the one before (HyrunEvalWorse
compares them) and the job's event carries the newest to the live view. Names become metric labels:
they are checked here, so a report can never grow the series without bound."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from hyrun.proto import hyrun_pb2 as pb

MAX_SOURCES = 64       # per report: a corpus's sources
MAX_TASK_SCORES = 128  # per report: (task, metric) pairs
_LABEL = re.compile(r"^[A-Za-z0-9_.:/+-]{1,80}$")


class EvalRejected(ValueError):
    """A report the coordinator will not export (names that cannot be labels)."""


class EvalForOtherJob(EvalRejected):
    """A report for a job that is not the coordinator's (ended, or never submitted here)."""


@dataclass(frozen=True)
class ScoredCheckpoint:
    step: int
    loss: dict[str, float]  # nats per token, per source
    perplexity: dict[str, float]
    tokens: dict[str, int]
    task_scores: dict[tuple[str, str], float] = field(default_factory=dict)  # (task, metric) -> value

    @property
    def mean_loss(self) -> float:
        """All sources together, weighted by the tokens each scored (NaN: none scored)."""
        total = sum(self.tokens.values())
        if not total:
            return math.nan
        return sum(self.loss[s] * self.tokens[s] for s in self.loss) / total


def check_report(report: pb.EvalReport, job_id: str | None) -> None:
    """Raises EvalRejected unless `report` is for the running job and its names can be labels."""
    if job_id is None or report.job_id != job_id:
        raise EvalForOtherJob(f"no job {report.job_id!r} (running: {job_id or 'none'})")
    if report.step == 0:
        raise EvalRejected("an evaluation names the checkpoint's step (> 0)")
    if len(report.sources) > MAX_SOURCES or len(report.tasks) > MAX_TASK_SCORES:
        raise EvalRejected(f"at most {MAX_SOURCES} sources and {MAX_TASK_SCORES} task scores per report")
    names = [s.source for s in report.sources] + [n for t in report.tasks for n in (t.task, t.metric)]
    bad = [name for name in names if not _LABEL.match(name)]
    if bad:
        raise EvalRejected(f"names must match {_LABEL.pattern}: {bad[:3]}")


def scored_checkpoint(report: pb.EvalReport) -> ScoredCheckpoint:
    return ScoredCheckpoint(
        step=report.step,
        loss={s.source: s.loss for s in report.sources},
        perplexity={s.source: s.perplexity for s in report.sources},
        tokens={s.source: s.tokens for s in report.sources},
        task_scores={(t.task, t.metric): t.value for t in report.tasks},
    )


def newest_two(kept: tuple[ScoredCheckpoint, ...], new: ScoredCheckpoint) -> tuple[ScoredCheckpoint, ...]:
    """The two highest steps among `kept` and `new`, newest first. The evaluation scores newest first,
    so a backlog's older checkpoint may arrive later: it becomes the previous one only if it is newer
    than the previous known; a step scored again replaces its earlier result."""
    by_step = {c.step: c for c in kept} | {new.step: new}
    return tuple(by_step[step] for step in sorted(by_step, reverse=True)[:2])


@dataclass
class EvalBook:
    """One job's scored checkpoints: the newest two, and how many evaluations failed."""

    kept: tuple[ScoredCheckpoint, ...] = ()
    failures: int = 0

    @property
    def newest(self) -> ScoredCheckpoint | None:
        return self.kept[0] if self.kept else None

    @property
    def previous(self) -> ScoredCheckpoint | None:
        return self.kept[1] if len(self.kept) > 1 else None

    def add(self, report: pb.EvalReport) -> None:
        if report.error:
            self.failures += 1
        else:
            self.kept = newest_two(self.kept, scored_checkpoint(report))
