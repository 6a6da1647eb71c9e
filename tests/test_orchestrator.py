"""The orchestrator end to end without processes: hand-made messages in, policy ticks at chosen
times, commands out. Planning is the plain even split and the rendezvous a fake (the planner and
the rules have their own tests); decide()'s rules one by one are in test_decide.py."""

from __future__ import annotations

import pytest

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.coordinator.generation import Generation, RankSlot
from hyrun.runtime.coordinator.lifecycle import GenState, IllegalTransition, JobState
from hyrun.runtime.coordinator.membership import CardRecord, Membership, NodeRecord
from hyrun.runtime.coordinator.ingest import JobRejected
from hyrun.runtime.coordinator.orchestrator import Orchestrator, OrchestratorSettings
from hyrun.runtime.coordinator.ranks import assign_ranks, plan_ranks
from hyrun.runtime.parallel.layout import ParallelLayout
from hyrun.runtime.coordinator.store import MemoryStore
from hyrun.runtime.coordinator.store_writer import StoreWriter
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.metrics import CoordinatorMetrics

from conftest import FakeRendezvous, job_dict


def _node(name: str, cards: int, now: float = 0.0, speed: float = 1.0) -> NodeRecord:
    records = tuple(CardRecord(i, "cpu-sim", 1 << 30, speed, True) for i in range(cards))
    return NodeRecord(name, "127.0.0.1", records, agent_pid=1, last_heartbeat_s=now)


def _even_split(spec, membership, excluded, measured_speed):
    return assign_ranks(spec, membership, excluded)


def _harness(tmp_path, plan=_even_split):
    membership = Membership()
    sent, published = [], []
    orch = Orchestrator(
        membership=membership,
        writer=StoreWriter(MemoryStore()),
        metrics=CoordinatorMetrics(),
        send=lambda node, cmd: sent.append((node, cmd)),
        publish=published.append,
        settings=OrchestratorSettings(run_root=str(tmp_path), heartbeat_timeout_s=2.0),
        open_rendezvous=FakeRendezvous,
        plan=plan,
    )
    return orch, membership, sent, published


@pytest.fixture
def harness(tmp_path):
    return _harness(tmp_path)


@pytest.fixture
def planned(tmp_path):
    """With the real planner, for the tests about what it is told (measured speeds)."""
    return _harness(tmp_path, plan=plan_ranks)


def _start(harness, **sections):
    orch, membership, sent, _ = harness
    spec = parse_job(job_dict(**sections))
    orch.submit(spec, now_s=0.0)
    orch.tick(0.0)
    assert orch.job.state is JobState.PENDING and not sent  # nodes not there yet
    for name in ("node-a", "node-b"):
        node = _node(name, 2)
        membership.register(node)
        orch.on_register(node, 0.0)
    orch.tick(0.0)
    return orch.job.generation


def _beat_all(harness, until_s: float, step_s: float = 0.5, skip: str = "") -> None:
    """Heartbeats from every node (but `skip`) and policy ticks up to `until_s`."""
    orch, membership, *_ = harness
    t = 0.0
    while t <= until_s:
        for name in membership.nodes:
            if name != skip:
                membership.heartbeat(name, t)
        orch.tick(t)
        t += step_s


def _step(gen: int, rank: int, step: int, loss: float = 2.0) -> pb.StepReport:
    return pb.StepReport(generation=gen, rank=rank, step=step, loss=loss, tokens=32, step_time_s=0.1)


def test_generation_starts_when_every_node_has_registered(harness):
    gen = _start(harness)
    _, _, sent, _ = harness
    assert gen.number == 1 and gen.world_size == 4
    starts = {node: cmd.start for node, cmd in sent}
    assert sorted(starts) == ["node-a", "node-b"]
    assert [r.rank for r in starts["node-b"].ranks] == [2, 3]
    assert [r.micro_batch_offset for r in starts["node-b"].ranks] == [2, 3]
    assert starts["node-a"].rendezvous.store_port == starts["node-b"].rendezvous.store_port > 0
    assert orch_state(harness) is JobState.RUNNING


def orch_state(harness):
    return harness[0].job.state


def test_step_completes_only_when_every_rank_reported_and_loss_is_token_weighted(harness):
    orch, *_ = harness
    gen = _start(harness)
    for rank in range(3):
        orch.on_step("node-a", _step(gen.number, rank, 1, loss=1.0), 1.0)
    assert orch.job.step == 0
    orch.on_step("node-b", _step(gen.number, 3, 1, loss=5.0), 1.0)
    assert orch.job.step == 1
    assert orch.job.loss == pytest.approx(2.0)
    assert gen.state is GenState.RUNNING


def test_a_failed_save_is_one_incident_that_restarts_nothing(harness):
    orch, *_ = harness
    gen = _start(harness)
    for step, failures in ((1, 0), (2, 1), (3, 1)):  # rank 0 keeps reporting the same failure count
        for rank in range(4):
            report = _step(gen.number, rank, step)
            report.checkpoint_failures, report.checkpoint_error = failures, "write failed: [Errno 28] No space left"
            orch.on_step("node-a" if rank < 3 else "node-b", report, float(step))
    (incident,) = orch.job.incidents
    assert incident.verdict == "save_failed" and "No space left" in incident.reason and not incident.cards
    assert orch.job.generation is gen and gen.state is GenState.RUNNING and orch.job.step == 3


def test_reports_from_an_older_generation_are_ignored(harness):
    orch, *_ = harness
    gen = _start(harness)
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number - 1, rank, 1), 1.0)
    orch.on_worker_exit("node-a", pb.WorkerExit(generation=gen.number - 1, rank=0, exit_code=-9, reason="killed"), 1.0)
    assert orch.job.step == 0 and orch.job.state is JobState.RUNNING


def test_without_fault_tolerance_a_failed_worker_ends_the_job_naming_node_card_and_reason(harness):
    orch, _, sent, published = harness
    gen = _start(harness, fault_tolerance={"enabled": False})
    sent.clear()
    orch.on_worker_exit(
        "node-b", pb.WorkerExit(generation=gen.number, rank=3, card_index=1, exit_code=-9, reason="killed by SIGKILL"), 2.0
    )
    orch.tick(2.0)  # without fault tolerance there is no grace: the first failure ends the job
    assert orch.job.state is JobState.FAILED
    assert "rank 3 on node node-b card 1 (cpu-sim) killed by SIGKILL" in orch.job.message
    assert sorted(node for node, cmd in sent if cmd.HasField("stop")) == ["node-a", "node-b"]
    assert published[-1].state == "FAILED"


def test_every_rank_finishing_completes_the_job(harness):
    orch, *_ = harness
    gen = _start(harness)
    for rank in range(4):
        orch.on_worker_exit("node-a", pb.WorkerExit(generation=gen.number, rank=rank, exit_code=0), 3.0)
    orch.tick(3.0)
    assert orch.job.state is JobState.COMPLETED and gen.state is GenState.COMPLETED


def test_without_fault_tolerance_a_lost_node_fails_the_job(harness):
    orch, membership, *_ = harness
    _start(harness, fault_tolerance={"enabled": False})
    _beat_all(harness, until_s=10.0, skip="node-b")
    assert not membership.nodes["node-b"].alive
    assert orch.job.state is JobState.FAILED and "node node-b lost" in orch.job.message


def _exit(gen: int, rank: int, code: int, reason: str) -> pb.WorkerExit:
    return pb.WorkerExit(generation=gen, rank=rank, card_index=rank % 2, exit_code=code, reason=reason)


def test_killed_worker_is_evicted_not_its_peers_and_the_job_continues_without_it(harness):
    orch, _, sent, _ = harness
    gen = _start(harness)
    sent.clear()
    orch.on_worker_exit("node-b", _exit(gen.number, 3, -9, "killed by SIGKILL"), 1.0)
    orch.on_worker_exit("node-a", _exit(gen.number, 0, 1, "exited with code 1: RuntimeError: Connection closed by peer"), 1.1)
    orch.tick(1.2)
    assert orch.job.generation is gen  # still collecting exits during the grace period
    orch.tick(1.6)
    new = orch.job.generation
    assert new.number == 2 and gen.state is GenState.STOPPED
    assert ("node-b", 1) not in [(s.node, s.card_index) for s in new.ranks]
    assert sum(new.layout.micro_batches_per_replica) == 4  # the whole global batch, on fewer cards
    assert [str(card) for card in orch.job.evicted] == ["node-b/card1"]
    assert "killed by SIGKILL" in orch.event().evictions[0]
    kinds = [(node, cmd.WhichOneof("body")) for node, cmd in sent]
    assert kinds == [("node-a", "stop"), ("node-b", "stop")] + [(node, "start") for node in new.nodes]


def test_steps_trained_again_after_a_resume_are_counted(harness):
    orch, *_ = harness
    gen = _start(harness)
    for step in (1, 2, 3):
        for rank in range(4):
            orch.on_step("node-a", _step(gen.number, rank, step), 1.0)
    orch.on_worker_exit("node-b", _exit(gen.number, 3, -9, "killed by SIGKILL"), 2.0)
    orch.tick(3.0)
    new = orch.job.generation
    assert new.number == 2
    for slot in new.ranks:  # resumed from a checkpoint at step 1: steps 2 and 3 run again
        orch.on_step(slot.node, _step(new.number, slot.rank, 2), 4.0)
    assert orch.job.step == 2 and orch.job.steps_lost == 2


def test_lost_node_is_evicted_whole_and_the_job_continues(harness):
    orch, membership, *_ = harness
    gen = _start(harness)
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number, rank, 1), 1.0)
    _beat_all(harness, until_s=10.0, skip="node-b")
    gen = orch.job.generation
    assert gen.number == 2 and {s.node for s in gen.ranks} == {"node-a"}
    assert sorted(str(c) for c in orch.job.evicted) == ["node-b/card0", "node-b/card1"]


def test_the_job_fails_when_no_card_is_left(harness):
    orch, membership, *_ = harness
    gen = _start(harness, cluster={"nodes": [{"name": "node-a", "cards": [{"count": 2}]}, {"name": "node-b", "cards": [{"count": 2}]}]})
    for rank in range(4):
        orch.on_worker_exit("node-a", _exit(gen.number, rank, -9, "killed by SIGKILL"), 1.0)
    orch.tick(2.0)
    assert orch.job.state is JobState.FAILED and "no usable card is left" in orch.job.message
    assert len(orch.job.evicted) == 4


def test_nodes_that_never_come_fail_the_job_after_the_wait(harness):
    orch, *_ = harness
    orch.submit(parse_job(job_dict(runtime={"node_wait_timeout_s": 5})), now_s=0.0)
    orch.tick(4.0)
    assert orch.job.state is JobState.PENDING
    orch.tick(6.0)
    assert orch.job.state is JobState.FAILED and "node-a, node-b" in orch.job.message


def test_one_job_at_a_time(harness):
    orch, *_ = harness
    _start(harness)
    with pytest.raises(JobRejected, match="one job at a time"):
        orch.submit(parse_job(job_dict()), now_s=1.0)


def test_uneven_micro_batch_split_covers_the_global_batch():
    membership = Membership()
    membership.register(_node("node-a", 2))
    membership.register(_node("node-b", 1))
    spec = parse_job(job_dict(
        cluster={"nodes": [{"name": "node-a", "cards": [{"count": 2}]}, {"name": "node-b", "cards": [{"count": 1}]}]},
        training={"global_batch": 10, "micro_batch": 2},
    ))  # fmt: skip
    slots = assign_ranks(spec, membership).slots
    assert [s.micro_batches for s in slots] == [2, 2, 1]
    assert [(s.node, s.card_index) for s in slots] == [("node-a", 0), ("node-a", 1), ("node-b", 0)]


def test_illegal_generation_transition_raises():
    gen = Generation(1, (RankSlot(0, "n", 0, "cpu-sim", 1.0, 1),), ParallelLayout.data_parallel([1]))
    with pytest.raises(IllegalTransition, match="STARTING -> DRAINING"):
        gen.transition(GenState.DRAINING)  # nothing to checkpoint before the first step
    gen.transition(GenState.COMPLETED)
    with pytest.raises(IllegalTransition, match="COMPLETED -> RUNNING"):
        gen.transition(GenState.RUNNING)


def test_a_hung_rank_is_found_and_evicted_after_the_timeout(harness):
    orch, *_ = harness
    gen = _start(harness, fault_tolerance={"hang_timeout_s": 5.0})
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number, rank, 1), 1.0)
    for rank in (0, 1, 3):
        orch.on_progress("node-a", pb.RankProgress(generation=gen.number, rank=rank, step=2, phase="reduce"), 2.0)
    orch.tick(6.5)
    assert orch.job.generation is gen  # 4.5 s of silence: not yet
    orch.tick(7.5)
    assert [str(c) for c in orch.job.evicted] == ["node-b/card0"]
    assert "rank 2 hung" in orch.event().evictions[0]
    assert orch.job.generation.number == 2


def _heartbeat(**card0) -> pb.Heartbeat:
    return pb.Heartbeat(cards=[pb.CardTelemetry(index=0, slowdown_temperature_c=90.0, **card0)])


def test_a_fatal_xid_evicts_that_card(harness):
    orch, *_ = harness
    _start(harness)
    orch.on_heartbeat("node-b", _heartbeat(temperature_c=50.0), 1.0)
    orch.tick(1.0)
    assert orch.job.generation.number == 1
    orch.on_heartbeat("node-b", _heartbeat(temperature_c=50.0, xid_events=[79]), 2.0)
    orch.tick(2.0)
    assert [str(c) for c in orch.job.evicted] == ["node-b/card0"] and "XID 79" in orch.event().evictions[0]


def test_a_card_heating_towards_its_threshold_is_drained(harness):
    orch, *_ = harness
    _start(harness, health={"temperature_horizon_s": 30})
    for t in range(8):
        orch.on_heartbeat("node-a", _heartbeat(temperature_c=60.0 + 2.0 * t), float(t))
        orch.tick(float(t))
    assert [str(c) for c in orch.job.evicted] == ["node-a/card0"]
    assert "rising" in orch.event().evictions[0]


def test_nan_on_one_rank_repeatedly_drains_it(harness):
    orch, *_ = harness
    # Without checkpoints a drain cannot save first: the card leaves at once.
    gen = _start(harness, health={"overflow_strikes": 2, "overflow_window_steps": 5}, checkpoint={"interval_steps": 0})
    for step in (1, 2):
        for rank in range(4):
            report = _step(gen.number, rank, step)
            report.nonfinite_grads = 3 if rank == 1 else 0
            orch.on_step("node-a", report, float(step))
        orch.tick(float(step))
    assert [str(c) for c in orch.job.evicted] == ["node-a/card1"]
    assert "suspected silent data corruption" in orch.event().evictions[0]


def test_a_drain_checkpoints_first_and_loses_no_step(harness):
    orch, _, sent, _ = harness
    gen = _start(harness, health={"temperature_horizon_s": 30})
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number, rank, 1), 1.0)
    sent.clear()
    orch.on_heartbeat("node-b", _heartbeat(temperature_c=88.0), 1.5)  # within 5 °C of slowdown
    orch.tick(1.5)
    assert orch.job.generation.state is GenState.DRAINING
    assert sorted(node for node, cmd in sent if cmd.HasField("checkpoint_now")) == ["node-a", "node-b"]
    assert orch.job.generation is gen  # still training until the checkpoint commits
    for rank in range(4):
        report = _step(gen.number, rank, 2)
        report.checkpoint_step = 2 if rank == 3 else 1
        orch.on_step("node-a", report, 2.0)
    orch.tick(2.0)
    assert orch.job.generation.number == 2
    assert [str(c) for c in orch.job.evicted] == ["node-b/card0"]
    (incident,) = orch.job.incidents
    assert incident.verdict == "drain" and incident.step_at_failure == 2
    for slot in orch.job.generation.ranks:
        orch.on_step(slot.node, _step(orch.job.generation.number, slot.rank, 3), 3.0)
    assert orch.job.steps_lost == 0


def test_a_drain_whose_checkpoint_never_commits_leaves_at_the_deadline(harness):
    orch, *_ = harness
    gen = _start(harness, fault_tolerance={"drain_timeout_s": 10})
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number, rank, 1), 1.0)
    orch.on_heartbeat("node-b", _heartbeat(temperature_c=89.0), 2.0)
    for t in (2.0, 5.0, 8.0, 11.0):
        orch.on_progress("node-a", pb.RankProgress(generation=gen.number, rank=0, step=2), t)  # not hung
        for name in ("node-a", "node-b"):
            orch.membership.heartbeat(name, t)
        orch.tick(t)
    assert orch.job.generation is gen
    orch.membership.heartbeat("node-a", 12.5)
    orch.membership.heartbeat("node-b", 12.5)
    orch.tick(12.5)
    assert orch.job.generation.number == 2


def test_operator_drain_of_a_node(harness):
    orch, _, sent, _ = harness
    gen = _start(harness)
    for rank in range(4):
        orch.on_step("node-a", _step(gen.number, rank, 1), 1.0)
    message = orch.drain_node("node-b", "night is over", 1.5)
    assert "draining node node-b" in message
    with pytest.raises(JobRejected, match="no node 'node-z'"):
        orch.drain_node("node-z", "", 1.5)
    orch.tick(1.5)
    assert any(cmd.HasField("checkpoint_now") for _, cmd in sent)
    report = _step(gen.number, 0, 2)
    report.checkpoint_step = 2
    orch.on_step("node-a", report, 2.0)
    orch.tick(2.0)
    assert {s.node for s in orch.job.generation.ranks} == {"node-a"}
    assert all("night is over" in e for e in orch.event().evictions)


def _half_speed_node_b(**job):
    """Membership and job of node-a (2 cards at 1.0) and node-b (2 at 0.5), 8 micro-batches a step."""
    membership = Membership()
    membership.register(_node("node-a", 2, speed=1.0))
    membership.register(_node("node-b", 2, speed=0.5))
    spec = parse_job(job_dict(
        cluster={"nodes": [{"name": "node-a", "cards": [{"count": 2}]}, {"name": "node-b", "cards": [{"count": 2, "speed": 0.5}]}]},
        training={"global_batch": 16, "micro_batch": 2}, **job,
    ))  # fmt: skip
    return membership, spec


def test_auto_parallelism_gives_faster_cards_more_micro_batches():
    membership, spec = _half_speed_node_b(parallelism="auto")
    planned = plan_ranks(spec, membership)
    by_card = {(s.node, s.card_index): s.micro_batches for s in planned.slots}
    assert sum(planned.layout.micro_batches_per_replica) == 8
    assert by_card[("node-a", 0)] > by_card[("node-b", 0)]
    without = plan_ranks(spec, membership, {CardRef("node-a", 0)})
    assert ("node-a", 0) not in {(s.node, s.card_index) for s in without.slots}
    assert sum(without.layout.micro_batches_per_replica) == 8


def test_an_even_split_ignores_card_speed():
    membership, spec = _half_speed_node_b(parallelism={"dp": 4, "split": "even"})
    assert plan_ranks(spec, membership).layout.micro_batches_per_replica == (2, 2, 2, 2)


def test_a_straggler_is_replanned_with_its_measured_speed_after_a_checkpoint(planned):
    harness = planned
    orch, _, sent, _ = harness
    gen = _start(harness, training={"global_batch": 16, "micro_batch": 2}, health={"straggler_ratio": 1.5, "straggler_drain_ratio": 4.0})
    for step in range(1, 6):
        for rank, slot in enumerate(gen.ranks):
            report = _step(gen.number, rank, step)
            per_micro_batch_s = 0.3 if rank == 3 else 0.1
            report.compute_time_s = per_micro_batch_s * slot.micro_batches
            orch.on_step(slot.node, report, float(step))
        orch.tick(float(step))
    assert any(cmd.HasField("checkpoint_now") for _, cmd in sent)
    report = _step(gen.number, 0, 6)
    report.checkpoint_step = 6
    orch.on_step("node-a", report, 6.0)
    orch.tick(6.0)
    new = orch.job.generation
    assert new.number == 2 and not orch.job.evicted  # the card stays, with less work
    assert orch.job.measured_speed[CardRef("node-b", 1)] == pytest.approx(1 / 3)
    shares = {(s.node, s.card_index): s.micro_batches for s in new.ranks}
    assert shares.get(("node-b", 1), 0) < shares[("node-a", 0)]
    assert orch.job.incidents[-1].verdict == "replan"


def _lose_node_b(harness):
    """Trains a step, then node-b goes silent and is evicted with its node (not for a fault)."""
    orch, membership, *_ = harness
    gen = orch.job.generation
    for rank in range(gen.world_size):
        orch.on_step(gen.slot(rank).node, _step(gen.number, rank, 1), 1.0)
    _beat_all(harness, until_s=10.0, skip="node-b")
    return orch.job.generation


def _rejoin(harness, name: str, now: float) -> None:
    orch, membership, *_ = harness
    back = _node(name, 2, now=now)
    back.registered_s = now
    membership.register(back)
    orch.on_register(back, now)


def _commit(harness, step: int, now: float) -> None:
    orch, membership, *_ = harness
    for name in membership.nodes:
        membership.heartbeat(name, now)
    gen = orch.job.generation
    for rank in range(gen.world_size):
        report = _step(gen.number, rank, step)
        report.checkpoint_step = step
        orch.on_step(gen.slot(rank).node, report, now)
    orch.tick(now)


def test_a_lost_node_that_comes_back_joins_at_the_next_checkpoint(harness):
    orch, membership, sent, _ = harness
    _start(harness)
    gen = _lose_node_b(harness)
    assert {s.node for s in gen.ranks} == {"node-a"}
    assert {e.cause.value for e in orch.job.evicted.values()} == {"node_silent"}
    for slot in gen.ranks:
        orch.on_step(slot.node, _step(gen.number, slot.rank, 1), 11.0)
    sent.clear()
    _rejoin(harness, "node-b", 12.0)
    orch.tick(12.0)
    assert any(cmd.HasField("checkpoint_now") for _, cmd in sent)  # no step lost: checkpoint first
    _commit(harness, 2, 13.0)
    assert {s.node for s in orch.job.generation.ranks} == {"node-a", "node-b"}
    assert orch.job.evicted == {} and orch.job.incidents[-1].verdict == "join"


def test_a_card_evicted_for_a_hardware_fault_stays_out_when_its_node_comes_back(harness):
    """node-b/card0 reports XID 79 and is evicted; later the whole node is lost; when node-b
    registers again only card1 (lost with its node) rejoins."""
    orch, membership, *_ = harness
    _start(harness, checkpoint={"interval_steps": 0})
    orch.on_heartbeat("node-b", _heartbeat(temperature_c=50.0, xid_events=[79]), 0.5)
    orch.tick(0.5)
    assert orch.job.evicted[CardRef("node-b", 0)].cause.value == "fatal_xid"
    gen = _lose_node_b(harness)
    assert {s.node for s in gen.ranks} == {"node-a"}
    _rejoin(harness, "node-b", 12.0)
    for t in (12.0, 12.5):
        membership.heartbeat("node-a", t)
        membership.heartbeat("node-b", t)
        orch.tick(t)  # no checkpoints configured: the join restarts at once
    cards = {(s.node, s.card_index) for s in orch.job.generation.ranks}
    assert ("node-b", 1) in cards and ("node-b", 0) not in cards
    assert list(orch.job.evicted) == [CardRef("node-b", 0)]


def test_a_node_left_out_of_a_generation_on_purpose_does_not_rejoin_it(harness):
    """A node registered before the generation started and is not in it (its cards evicted for a
    fault): no join loop."""
    orch, membership, sent, _ = harness
    gen = _start(harness, checkpoint={"interval_steps": 0})
    for index in (0, 1):
        orch.on_heartbeat("node-b", pb.Heartbeat(cards=[pb.CardTelemetry(index=index, xid_events=[79])]), 0.5)
    orch.tick(0.5)
    gen = orch.job.generation
    assert gen.number == 2 and gen.nodes == ["node-a"]
    sent.clear()
    for t in (1.0, 1.5, 2.0):
        membership.heartbeat("node-a", t)
        membership.heartbeat("node-b", t)
        orch.tick(t)
    assert orch.job.generation is gen and not sent


def test_a_card_an_operator_readmits_joins_at_the_next_checkpoint_and_is_asked_for_once(harness):
    orch, membership, sent, _ = harness
    gen = _start(harness)
    orch.on_worker_exit("node-b", _exit(gen.number, 3, -9, "killed by SIGKILL"), 1.0)
    orch.tick(1.6)
    gen = orch.job.generation
    assert gen.number == 2 and list(orch.job.evicted) == [CardRef("node-b", 1)]
    with pytest.raises(JobRejected, match="no card 7"):
        orch.readmit_cards("node-b", [7], "")
    assert "already train" in orch.readmit_cards("node-a", [0], "")
    message = orch.readmit_cards("node-b", [1], "card replaced")
    assert "node-b/card1" in message and "killed by SIGKILL" in message
    assert orch.job.evicted == {} and list(orch.job.readmit_requests) == [CardRef("node-b", 1)]
    for slot in gen.ranks:
        orch.on_step(slot.node, _step(gen.number, slot.rank, 1), 2.0)
    sent.clear()
    for t in (2.0, 2.5):
        membership.heartbeat("node-a", t)
        membership.heartbeat("node-b", t)
        orch.tick(t)
    assert any(cmd.HasField("checkpoint_now") for _, cmd in sent)  # no step lost: checkpoint first
    _commit(harness, 2, 3.0)
    joined = orch.job.generation
    assert joined.number == 3 and ("node-b", 1) in [(s.node, s.card_index) for s in joined.ranks]
    assert orch.job.incidents[-1].verdict == "join" and "card replaced" in orch.job.incidents[-1].reason
    assert orch.job.readmit_requests == {}  # asked once: a plan that leaves it out does not loop


def test_a_pipeline_stage_is_measured_per_layer_it_holds():
    """Stage 0 holds 3 of 4 layers: three times the compute of stage 1 per micro-batch is its share
    of the work, not a slow card."""
    layout = ParallelLayout(dp=1, pp=2, layers_per_stage=(3, 1), micro_batches_per_replica=(4,))
    assert layout.stage_share(0) == 0.75 and layout.stage_share(1) == 0.25
    assert ParallelLayout.data_parallel([2, 2]).stage_share(1) == 1.0
