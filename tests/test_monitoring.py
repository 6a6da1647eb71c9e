"""The coordinator's Prometheus series without processes: which cards get series of their own, how
throttle reasons and checkpoint errors become bounded labels, and what hand-made heartbeats, step
reports and recoveries put into the registry. The same families against a real Prometheus and a
real job: test_monitoring_prometheus.py."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.card_metrics import CardCollector, CardRow, cards_to_export, throttle_reasons
from hyrun.runtime.coordinator.lifecycle import JobState
from hyrun.runtime.coordinator.membership import CardRecord, Membership, NodeRecord
from hyrun.runtime.coordinator.orchestrator import Orchestrator, OrchestratorSettings
from hyrun.runtime.coordinator.ranks import assign_ranks
from hyrun.runtime.coordinator.store import MemoryStore
from hyrun.runtime.coordinator.store_writer import StoreWriter
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.metrics import CoordinatorMetrics, checkpoint_failure_cause

from conftest import FakeRendezvous, job_dict


def _value(metrics: CoordinatorMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# ------------------------------------------------------------------------------------ pure parts


def test_every_card_is_exported_up_to_the_limit():
    rows = [CardRow("n", i, temperature_c=50.0, slowdown_c=90.0) for i in range(3)]
    assert cards_to_export(rows, limit=3) == rows


def test_beyond_the_limit_troubled_cards_come_first_then_the_hottest():
    cool = [CardRow(f"n{i}", 0, temperature_c=40.0, slowdown_c=90.0) for i in range(5)]
    hot = CardRow("hot", 0, temperature_c=85.0, slowdown_c=90.0)
    xid = CardRow("xid", 0, temperature_c=30.0, slowdown_c=90.0, xid_counts={79: 1})
    out = CardRow("out", 0, temperature_c=30.0, slowdown_c=90.0, quarantined=True)
    throttled = CardRow("power", 0, temperature_c=30.0, slowdown_c=90.0, throttle_mask=0x4)
    idle = CardRow("idle", 0, temperature_c=30.0, slowdown_c=90.0, throttle_mask=0x1)  # gpu_idle is no trouble
    chosen = cards_to_export([*cool, idle, hot, xid, out, throttled], limit=4)
    assert {r.node for r in chosen} == {"xid", "out", "power", "hot"}


def test_throttle_masks_are_named_by_nvml_reason():
    assert throttle_reasons(0) == []
    assert throttle_reasons(0x20 | 0x40) == ["sw_thermal", "hw_thermal"]
    assert throttle_reasons(0x4 | 0x10000) == ["sw_power_cap", "0x10000"]


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        ("step-000000004: rank 1: OSError: [Errno 28] No space left on device", "no_space"),
        ("step-000000004: PermissionError: [Errno 13] Permission denied: '/ckpt'", "permission"),
        ("step-000000008: commit vote timed out after 60 s", "timeout"),
        ("step-000000008: internal error: KeyError: 'x'", "internal"),
        ("step-000000008: rank 2: RuntimeError: Connection reset by peer", "peer"),
        ("step-000000008: FileNotFoundError: No such file or directory", "io"),
        ("step-000000008: something new", "other"),
    ],
)
def test_checkpoint_errors_become_a_bounded_cause(error, cause):
    assert checkpoint_failure_cause(error) == cause


def test_loop_lag_is_the_worst_of_the_last_fifteen_seconds():
    metrics = CoordinatorMetrics()
    for now_s, lag_s in [(0.0, 0.1), (1.0, 2.0), (2.0, 0.2), (10.0, 0.05)]:
        metrics.note_loop_lag(lag_s, now_s)
    assert _value(metrics, "hyrun_coordinator_loop_lag_seconds") == 2.0
    metrics.note_loop_lag(0.01, 17.5)  # the 2 s stall left the window, and the 0.2 s one
    assert _value(metrics, "hyrun_coordinator_loop_lag_seconds") == 0.05


# ------------------------------------------------------------------------------ card collector


def _beat(*cards: pb.CardTelemetry) -> pb.Heartbeat:
    return pb.Heartbeat(sequence=1, cards=list(cards))


def test_card_series_come_from_the_newest_heartbeat_and_xids_accumulate():
    metrics = CoordinatorMetrics()
    cards = metrics.cards_health
    cards.fatal_xids = frozenset({79})
    cards.register_node("node-a", [(0, "H100", 80 << 30), (1, "H100", 80 << 30)])
    cards.ingest("node-a", _beat(pb.CardTelemetry(index=0, temperature_c=70, slowdown_temperature_c=90, power_w=400,
                                                  utilization=0.9, memory_used_bytes=10 << 30, xid_events=[79, 13]),
                                 pb.CardTelemetry(index=1, temperature_c=50, slowdown_temperature_c=90)).cards)  # fmt: skip
    cards.ingest("node-a", _beat(pb.CardTelemetry(index=0, temperature_c=88, slowdown_temperature_c=90, xid_events=[79],
                                                  ecc_uncorrected=2, throttle_reasons=0x40)).cards)  # fmt: skip
    cards.set_quarantined(frozenset({("node-a", 0)}))
    card0 = {"node": "node-a", "card": "0", "card_type": "H100"}
    assert _value(metrics, "hyrun_card_temperature_celsius", **card0) == 88
    assert _value(metrics, "hyrun_card_slowdown_temperature_celsius", **card0) == 90
    assert _value(metrics, "hyrun_card_memory_total_bytes", **card0) == 80 << 30
    assert _value(metrics, "hyrun_card_xid_events_total", **card0, xid="79", fatal="true") == 2
    assert _value(metrics, "hyrun_card_xid_events_total", **card0, xid="13", fatal="false") == 1
    assert _value(metrics, "hyrun_card_ecc_uncorrected_errors_total", **card0) == 2
    assert _value(metrics, "hyrun_card_throttle_reasons", **card0, reason="hw_thermal") == 1
    assert _value(metrics, "hyrun_card_quarantined", **card0) == 1
    assert _value(metrics, "hyrun_card_quarantined", node="node-a", card="1", card_type="H100") == 0
    # The fleet histogram counts every card by margin: card 0 is 2 °C from throttling, card 1 40 °C.
    assert _value(metrics, "hyrun_cards_temperature_margin_celsius_bucket", card_type="H100", le="2.0") == 1
    assert _value(metrics, "hyrun_cards_temperature_margin_celsius_bucket", card_type="H100", le="40.0") == 2


def test_past_the_limit_cards_leave_their_series_but_stay_in_the_histogram():
    metrics = CoordinatorMetrics(card_series_limit=2)
    metrics.cards_health.ingest("n", [pb.CardTelemetry(index=i, temperature_c=40 + i, slowdown_temperature_c=90) for i in range(5)])
    body = generate_latest(metrics.registry).decode()
    assert body.count("hyrun_card_temperature_celsius{") == 2
    assert 'hyrun_card_temperature_celsius{card="4"' in body and 'card="3"' in body  # the hottest two
    assert _value(metrics, "hyrun_cards_unexported") == 3
    assert _value(metrics, "hyrun_cards_temperature_margin_celsius_bucket", card_type="unknown", le="+Inf") == 5


# ----------------------------------------------------------------------------- the orchestrator


def _node(name: str, cards: int) -> NodeRecord:
    return NodeRecord(name, "127.0.0.1", tuple(CardRecord(i, "cpu-sim", 1 << 30, 1.0, True) for i in range(cards)),
                      agent_pid=1, last_heartbeat_s=0.0)  # fmt: skip


@pytest.fixture
def running(tmp_path):
    membership, metrics = Membership(), CoordinatorMetrics(clock=lambda: 10.0)
    orch = Orchestrator(
        membership=membership, writer=StoreWriter(MemoryStore()), metrics=metrics, send=lambda node, cmd: None,
        publish=lambda event: None, settings=OrchestratorSettings(run_root=str(tmp_path), heartbeat_timeout_s=2.0),
        open_rendezvous=FakeRendezvous, plan=lambda spec, m, excluded, speeds: assign_ranks(spec, m, excluded),
    )  # fmt: skip
    orch.submit(parse_job(job_dict(checkpoint={"interval_steps": 2})), now_s=0.0)
    for name in ("node-a", "node-b"):
        membership.register(_node(name, 2))
        orch.on_register(membership.nodes[name], 0.0)
    orch.tick(0.0)
    assert orch.job.state is JobState.RUNNING
    return orch, metrics


def _report(orch, rank: int, step: int, now_s: float, **fields) -> None:
    gen = orch.job.generation
    slot = gen.slot(rank)
    report = pb.StepReport(generation=gen.number, rank=rank, step=step, loss=2.0, tokens=64, step_time_s=0.5,
                           compute_time_s=0.3, grad_norm=1.5, **{"checkpoint_step": -1, **fields})  # fmt: skip
    orch.on_step(slot.node, report, now_s)


def test_step_reports_fill_rank_checkpoint_and_job_series(running):
    orch, metrics = running
    assert _value(metrics, "hyrun_job_running") == 1
    assert _value(metrics, "hyrun_rank_nonfinite_grad_steps_total", rank="3", node="node-b") == 0  # there before any step
    for rank in range(4):
        _report(orch, rank, 1, 1.0, nonfinite_grads=1 if rank == 3 else 0)
    for rank in range(4):
        extra = {"checkpoint_step": 2, "checkpoint_persist_s": 1.5, "checkpoint_stall_s": 0.02}
        _report(orch, rank, 2, 2.0, **extra, **({"checkpoint_bytes": 4096} if rank == 0 else {}))
    assert _value(metrics, "hyrun_rank_nonfinite_grad_steps_total", rank="3", node="node-b") == 1
    assert _value(metrics, "hyrun_steps_skipped_total") == 1
    assert _value(metrics, "hyrun_rank_grad_norm", rank="0", node="node-a") == 1.5
    assert _value(metrics, "hyrun_step_time_seconds") == 0.5
    assert _value(metrics, "hyrun_checkpoint_last_committed_step") == 2
    assert _value(metrics, "hyrun_checkpoint_size_bytes") == 4096
    assert _value(metrics, "hyrun_checkpoint_durable_seconds_count") == 1  # once per commit, not per rank
    assert _value(metrics, "hyrun_checkpoint_stall_seconds_count") == 4  # every rank's stall
    assert _value(metrics, "hyrun_checkpoint_interval_seconds") == pytest.approx(2 * 0.5)
    assert _value(metrics, "hyrun_checkpoint_age_seconds") == 10.0 - 2.0  # committed at 2.0, scraped at 10.0
    _report(orch, 0, 3, 3.0, checkpoint_failures=1, checkpoint_error="step-000000004: OSError: No space left on device")
    assert _value(metrics, "hyrun_checkpoint_failures_total", cause="no_space") == 1


def test_a_recovery_counts_its_verdict_cause_detection_and_resume_times(running):
    orch, metrics = running
    for rank in range(4):
        _report(orch, rank, 1, 1.0)
    gen = orch.job.generation
    orch.on_worker_exit("node-b", pb.WorkerExit(generation=gen.number, rank=3, card_index=1, exit_code=-9,
                                                reason="killed by SIGKILL"), 1.5)  # fmt: skip
    orch.tick(5.0)  # past the failure grace: evict, next generation
    assert orch.job.generation.number == 2
    labels = {"verdict": "evict", "cause": "worker_exit", "node": "node-b", "card": "1"}
    assert _value(metrics, "hyrun_evictions_total", **labels) == 1
    assert _value(metrics, "hyrun_replans_total", cause="worker_exit") == 1
    assert _value(metrics, "hyrun_recovery_detection_seconds_sum", verdict="evict") == pytest.approx(4.0)
    assert _value(metrics, "hyrun_rank_step_time_seconds", rank="3", node="node-b") is None  # the old ranks are gone
    assert math.isnan(_value(metrics, "hyrun_planner_predicted_step_time_seconds"))  # an even split has no prediction
    for rank in range(3):  # no checkpoint: the new generation trains step 1 again
        _report(orch, rank, 1, 7.0, resume_source="shared_memory" if rank else "disk", resume_fallbacks=1 if rank == 0 else 0)
    assert _value(metrics, "hyrun_recovery_resume_seconds_sum", verdict="evict") == pytest.approx(2.0)
    assert _value(metrics, "hyrun_steps_lost_total", verdict="evict") == 1
    assert _value(metrics, "hyrun_checkpoint_resumes_total", source="ram") == 2
    assert _value(metrics, "hyrun_checkpoint_resumes_total", source="disk") == 1
    assert _value(metrics, "hyrun_checkpoint_resume_fallbacks_total") == 1
    orch.tick(7.5)
    assert _value(metrics, "hyrun_card_quarantined", node="node-b", card="1", card_type="cpu-sim") == 1
    assert _value(metrics, "hyrun_card_quarantined", node="node-a", card="0", card_type="cpu-sim") == 0
