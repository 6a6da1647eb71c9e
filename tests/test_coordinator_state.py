"""What a coordinator that takes over reads back: the job document round trip, the store writer
that keeps the event loop off a slow or absent store, and the epoch fence agents apply."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import job_dict
from hyrun.agent.node_agent import from_leader
from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import CardRef, Cause, Evidence
from hyrun.runtime.coordinator.generation import Generation, RankSlot
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.membership import CardRecord, Membership, NodeRecord
from hyrun.runtime.coordinator.persist import UnreadableJob, job_document, newest, restore_job
from hyrun.runtime.coordinator.records import JobRecord
from hyrun.runtime.coordinator.store import Deposed, MemoryStore
from hyrun.runtime.coordinator.store_writer import StoreUnavailable, StoreWriter
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.parallel.layout import ParallelLayout


def _running_job() -> tuple[JobRecord, dict[str, NodeRecord]]:
    spec = parse_job(job_dict(training={"steps": 20}))
    job = JobRecord("t-1", spec, "/runs/t-1", submitted_s=100.0, state=JobState.RUNNING)
    slots = tuple(RankSlot(r, "node-a" if r < 2 else "node-b", r % 2, "cpu-sim", 1.0, 2) for r in range(3))
    layout = ParallelLayout(dp=3, micro_batches_per_replica=(2, 2, 2))
    job.generation = Generation(2, slots, layout, started_s=150.0, state=GenState.RUNNING)
    job.generation.committed_step = 10
    job.generations_started, job.step, job.loss, job.steps_lost = 2, 12, 3.25, 1
    job.evicted = {CardRef("node-b", 1): Evidence.of(Cause.FATAL_XID, xids=(79, 48))}
    job.measured_speed = {CardRef("node-a", 0): 0.5}
    job.measured_link_mbit = {"node-b": 80.0}
    job.blamed_errors = {"sig": (CardRef("node-b", 1),)}
    job.incidents = [pb.Incident(cards=["node-b/card1"], verdict="evict", reason="fatal XID", generation=1, steps_lost=1)]
    cards = (CardRecord(0, "cpu-sim", 1 << 30, 1.0, True), CardRecord(1, "cpu-sim", 1 << 30, 1.0, True))
    nodes = {n: NodeRecord(n, "127.0.0.1", cards, agent_pid=7, last_heartbeat_s=190.0) for n in ("node-a", "node-b", "spare")}
    return job, nodes


def test_a_job_document_survives_the_store_and_a_new_process():
    job, nodes = _running_job()
    doc = json.loads(json.dumps(job_document(job, nodes, now_s=200.0, wall_s=1e9)))  # what etcd hands back
    restored, placeholders = restore_job(doc, now_s=5.0)  # another process: another monotonic clock
    assert (restored.job_id, restored.state, restored.step, restored.loss) == ("t-1", JobState.RUNNING, 12, 3.25)
    assert restored.submitted_s == pytest.approx(5.0 - 100.0)  # its age is kept, not its clock
    assert restored.generations_started == 2 and restored.steps_lost == 1
    gen = restored.generation
    assert gen.number == 2 and gen.ranks == job.generation.ranks and gen.committed_step == 10
    assert gen.layout == job.generation.layout
    assert gen.state is GenState.RUNNING and gen.last_progress_s == 5.0  # the hang clock starts at the restore
    assert restored.evicted[CardRef("node-b", 1)].cause is Cause.FATAL_XID
    assert restored.evicted[CardRef("node-b", 1)]["xids"] == (79, 48)
    assert restored.measured_speed == job.measured_speed and restored.measured_link_mbit == job.measured_link_mbit
    assert restored.blamed_errors == job.blamed_errors and restored.incidents == job.incidents
    # Only the job's own nodes come back, as placeholders not yet connected.
    assert sorted(n.name for n in placeholders) == ["node-a", "node-b"]
    assert all(not n.connected and n.restored and n.cards == nodes["node-a"].cards for n in placeholders)


def test_a_reconnecting_node_keeps_its_placeholder_registration_time():
    membership = Membership()
    job, nodes = _running_job()
    _, placeholders = restore_job(json.loads(json.dumps(job_document(job, nodes, 200.0, 1e9))), now_s=5.0)
    for node in placeholders:
        membership.register(node)
    membership.register(NodeRecord("node-a", "127.0.0.1", (), agent_pid=8, last_heartbeat_s=9.0))
    assert membership.nodes["node-a"].registered_s == 5.0 and membership.nodes["node-a"].connected


def test_the_newest_job_is_taken_on_and_other_formats_are_refused():
    job, nodes = _running_job()
    running = job_document(job, nodes, 200.0, wall_s=2e9)
    done = dict(running, job_id="done", state="COMPLETED", saved_unix_s=3e9)
    older = dict(running, job_id="older", saved_unix_s=1e9)
    assert newest({"jobs/older": older, "jobs/t-1": running})["job_id"] == "t-1"
    # A job that ended is kept (to answer its launcher), not carried on: nothing of it is restored as running.
    assert newest({"jobs/done": done, "jobs/t-1": running})["job_id"] == "done"
    restored, _ = restore_job(json.loads(json.dumps(dict(done, generation=dict(running["generation"], ended=True)))), 0.0)
    assert restored.ended and restored.generation is None
    with pytest.raises(UnreadableJob, match="format 1"):
        restore_job(dict(running, format=1), now_s=0.0)


class FlakyStore(MemoryStore):
    """Refuses the first `failures` writes as an etcd that is down would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.writes: list[tuple[str, dict]] = []

    def put(self, key, value):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("etcd down")
        self.writes.append((key, value))
        super().put(key, value)


def test_the_writer_rides_out_a_store_outage_and_writes_the_newest_state():
    store = FlakyStore(failures=3)
    writer = StoreWriter(store)
    for step in range(5):
        writer.write("jobs/a", {"step": step})
    writer.write_through("jobs/b", {"x": 1}, timeout_s=30)  # waits out the outage
    assert store.get("jobs/a") == {"step": 4} and store.get("jobs/b") == {"x": 1}
    assert len(store.writes) <= 3  # older documents of a key are replaced, not queued
    assert writer.pending == 0
    writer.close()


def test_a_write_that_must_be_durable_fails_after_its_timeout_and_a_deposed_writer_stops():
    store = FlakyStore(failures=10**6)
    writer = StoreWriter(store)
    with pytest.raises(StoreUnavailable):
        writer.write_through("jobs/a", {"step": 1}, timeout_s=0.3)
    writer.close(timeout_s=0.1)

    class Fenced(MemoryStore):
        def put(self, key, value):
            raise Deposed("another coordinator leads")

    heard = threading.Event()
    writer = StoreWriter(Fenced(), on_deposed=lambda error: heard.set())
    with pytest.raises(Deposed):
        writer.write_through("jobs/a", {"step": 1}, timeout_s=10)
    assert heard.is_set() and writer.deposed is not None


@pytest.mark.parametrize(
    ("epoch", "highest", "obeyed"),
    [(5, 5, True), (6, 5, True), (4, 5, False), (0, 0, True), (0, 5, False)],
)
def test_agents_obey_only_the_newest_leader(epoch, highest, obeyed):
    command = pb.CoordinatorCommand(stop=pb.StopGeneration(generation=1), epoch=epoch)
    assert from_leader(command, highest) is obeyed
