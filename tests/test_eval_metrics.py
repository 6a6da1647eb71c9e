"""Evaluation results reach the coordinator's metrics: the ReportEval RPC (token checked, reports for
another job or with names that cannot be labels refused), the newest two scored checkpoints (a backlog's
older checkpoint scored late never replaces the newest), failures counted, and the newest in the job's
events and the launcher's live view."""

from __future__ import annotations

import io
import math
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.common.security import call_metadata
from hyrun.runtime.coordinator.evaluations import (
    EvalForOtherJob, EvalRejected, ScoredCheckpoint, check_report, newest_two,
)  # fmt: skip
from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings
from hyrun.runtime.eval.report import CoordinatorTarget, eval_report, send_report
from hyrun.runtime.progress import ProgressView

from conftest import FakeRendezvous, job_dict

TOKEN = "s3cret"


def _checkpoint(step: int, loss: float) -> ScoredCheckpoint:
    return ScoredCheckpoint(step, {"a": loss}, {"a": math.exp(loss)}, {"a": 10})


def test_the_newest_two_steps_are_kept_whatever_order_they_are_scored_in():
    kept = newest_two((), _checkpoint(10, 3.0))
    kept = newest_two(kept, _checkpoint(6, 3.5))  # the backlog, newest first
    assert [c.step for c in kept] == [10, 6]
    kept = newest_two(kept, _checkpoint(8, 3.2))  # newer than the previous: it is the previous now
    assert [c.step for c in kept] == [10, 8]
    kept = newest_two(kept, _checkpoint(4, 4.0))  # older than both: changes nothing
    assert [c.step for c in kept] == [10, 8]
    kept = newest_two(kept, _checkpoint(10, 2.9))  # scored again: replaced
    assert [(c.step, c.loss["a"]) for c in kept] == [(10, 2.9), (8, 3.2)]


def test_reports_for_another_job_or_with_unlabelable_names_are_refused():
    good = eval_report("job-1", {"step": 2, "sources": {"email": {"loss": 3.0, "perplexity": 20.1, "tokens": 9}}})
    check_report(good, "job-1")
    with pytest.raises(EvalForOtherJob):
        check_report(good, "job-2")
    with pytest.raises(EvalForOtherJob):
        check_report(good, None)
    bad = eval_report("job-1", {"step": 2, "sources": {'x"} 1\nevil': {"loss": 3.0, "perplexity": 20.1}}})
    with pytest.raises(EvalRejected, match="names must match"):
        check_report(bad, "job-1")
    with pytest.raises(EvalRejected, match="step"):
        check_report(eval_report("job-1", {"step": 0}), "job-1")


@pytest.fixture
def service(tmp_path):
    svc = CoordinatorService(CoordinatorSettings(token=TOKEN, run_root=str(tmp_path), heartbeat_interval_s=0.1,
                                                 heartbeat_timeout_s=1.0), open_rendezvous=FakeRendezvous)  # fmt: skip
    svc.start()
    yield svc
    svc.stop()


def _submit(service, job: dict, job_id: str) -> None:
    with grpc.insecure_channel(service.address) as channel:
        pb_grpc.CoordinatorStub(channel).SubmitJob(pb.SubmitJobRequest(job_yaml=yaml.safe_dump(job), job_id=job_id),
                                                   metadata=call_metadata(TOKEN), timeout=10)


def _scrape(service) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _record(step: int, losses: dict[str, float], **extra) -> dict:
    return {"step": step, "duration_s": 1.5, "sources": {
        name: {"loss": loss, "perplexity": math.exp(loss), "tokens": 100} for name, loss in losses.items()}, **extra}


@pytest.mark.timeout(60)
def test_reported_evaluations_become_metrics_and_the_jobs_events(service):
    job = job_dict(data={"path": "corpus", "validation": {"regression_margin": 0.05}})
    _submit(service, job, "job-eval")
    target = CoordinatorTarget(service.address, "job-eval", TOKEN)

    assert "UNAUTHENTICATED" in send_report(CoordinatorTarget(service.address, "job-eval", "wrong"), _record(2, {"a": 3.0}))
    assert "NOT_FOUND" in send_report(CoordinatorTarget(service.address, "other-job", TOKEN), _record(2, {"a": 3.0}))
    assert send_report(target, _record(4, {"a": 3.0, "b": 4.0})) == ""
    assert send_report(target, _record(2, {"a": 3.5, "b": 4.5})) == ""  # the backlog: the previous checkpoint
    assert send_report(target, {"step": 6, "duration_s": 0.5, "error": "RuntimeError: boom"}) == ""
    metrics = _scrape(service)
    assert metrics[("hyrun_eval_checkpoint_step", ())] == 4
    assert metrics[("hyrun_eval_loss", (("source", "a"),))] == 3.0
    assert metrics[("hyrun_eval_perplexity", (("source", "b"),))] == pytest.approx(math.exp(4.0))
    assert metrics[("hyrun_eval_previous_loss", (("source", "a"),))] == 3.5
    assert metrics[("hyrun_eval_failures_total", ())] == 1
    assert metrics[("hyrun_eval_duration_seconds_count", ())] == 3
    assert metrics[("hyrun_eval_regression_margin_ratio", ())] == 0.05

    assert send_report(target, _record(8, {"a": 3.3, "b": 3.9}, tasks={"tiny_mc": {"acc": 0.75}})) == ""
    metrics = _scrape(service)
    assert metrics[("hyrun_eval_loss", (("source", "a"),))] == 3.3
    assert metrics[("hyrun_eval_previous_loss", (("source", "a"),))] == 3.0  # step 4 is the previous now
    assert metrics[("hyrun_eval_task_score", (("metric", "acc"), ("task", "tiny_mc")))] == 0.75
    with grpc.insecure_channel(service.address) as channel:
        status = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), metadata=call_metadata(TOKEN), timeout=5)
    event = status.jobs[0]
    assert event.eval_step == 8 and event.eval_loss == pytest.approx(3.6)  # token-weighted over a and b

    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200), live=False, plain_every_s=0.0)
    event.step, event.total_steps = 9, 10
    view.update(event)
    assert "eval 3.6000 @8" in out.getvalue()
