"""The job as the store keeps it, and back: everything a coordinator needs to carry on a job that a
crashed or deposed one was running — spec, state, generation number and layout, membership with
quarantined cards and their evidence, step progress, the newest committed checkpoint, incidents.

One JSON document per job (`jobs/JOB_ID`), written whole: a reader never sees half an update.
Times are stored as seconds since submission (monotonic clocks do not survive a process). A
restored generation is RUNNING with its clocks started at the restore: its workers trained on
through the gap and report again; if none does within the hang timeout it is restarted.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.actions import CardRef, Cause, Evidence
from hyrun.runtime.coordinator.generation import Generation, RankSlot
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.membership import CardRecord, NodeRecord
from hyrun.runtime.coordinator.records import JobRecord
from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.parallel.layout import ParallelLayout

FORMAT = 2  # bumped when the document changes shape; older documents are refused, not misread
JOBS_PREFIX = "jobs/"


def job_key(job_id: str) -> str:
    return f"{JOBS_PREFIX}{job_id}"


def _card(card: CardRef) -> str:
    return f"{card.node}/{card.index}"


def _card_ref(text: str) -> CardRef:
    node, _, index = text.rpartition("/")
    return CardRef(node, int(index))


def _evidence(evidence: Evidence) -> dict[str, Any]:
    return {"cause": evidence.cause.value, "facts": dict(evidence.facts)}


def _evidence_back(data: dict[str, Any]) -> Evidence:
    facts = {k: tuple(v) if isinstance(v, list) else v for k, v in data["facts"].items()}
    return Evidence.of(Cause(data["cause"]), **facts)


def job_document(job: JobRecord, nodes: dict[str, NodeRecord], now_s: float, wall_s: float) -> dict[str, Any]:
    """What the store keeps of a job (`nodes`: the membership, for the cards each node has;
    `wall_s`: the Unix time, so the newest of several stored jobs can be told)."""
    gen = job.generation
    generation = None
    if gen is not None:
        generation = {
            "number": gen.number,
            "ended": gen.ended,
            "ranks": [slot.__dict__ for slot in gen.ranks],
            "layout": gen.layout.to_json() if gen.layout is not None else None,
            "committed_step": gen.committed_step,
            "saves_failed": gen.saves_failed,
        }
    return {
        "format": FORMAT,
        "job_id": job.job_id,
        "state": job.state.value,
        "spec": job.spec.model_dump(mode="json"),
        "run_dir": job.run_dir,
        "age_s": now_s - job.submitted_s,
        "saved_unix_s": wall_s,
        "message": job.message,
        "step": job.step,
        "loss": job.loss,
        "generations_started": job.generations_started,
        "generation": generation,
        "steps_lost": job.steps_lost,
        "step_at_failure": job.step_at_failure,
        "evicted": {_card(c): _evidence(e) for c, e in job.evicted.items()},
        "drain_requests": {_card(c): _evidence(e) for c, e in job.drain_requests.items()},
        "readmit_requests": {_card(c): _evidence(e) for c, e in job.readmit_requests.items()},
        "measured_speed": {_card(c): s for c, s in job.measured_speed.items()},
        "measured_link_mbit": dict(job.measured_link_mbit),
        "blamed_errors": {sig: [_card(c) for c in cards] for sig, cards in job.blamed_errors.items()},
        "incidents": [json_format.MessageToDict(i, preserving_proto_field_name=True) for i in job.incidents],
        "nodes": {
            name: {"host": n.host, "cards": [c.__dict__ for c in n.cards]}
            for name, n in nodes.items() if name in {node.name for node in job.spec.cluster.nodes}
        },
    }  # fmt: skip


class UnreadableJob(ValueError):
    """A stored job this coordinator cannot carry on (another format, a spec it rejects)."""


def restore_job(doc: dict[str, Any], now_s: float) -> tuple[JobRecord, list[NodeRecord]]:
    """The job record a new coordinator carries on with, and placeholder records for its nodes
    (not connected until their agents register again; silent ones are lost after the startup grace)."""
    if doc.get("format") != FORMAT:
        raise UnreadableJob(f"job {doc.get('job_id')!r}: stored in format {doc.get('format')}, this coordinator reads {FORMAT}")
    try:
        spec = JobSpec.model_validate(doc["spec"])
    except ValueError as error:
        raise UnreadableJob(f"job {doc['job_id']!r}: its stored spec no longer validates: {error}") from error
    submitted_s = now_s - doc["age_s"]
    job = JobRecord(doc["job_id"], spec, doc["run_dir"], submitted_s=submitted_s, state=JobState(doc["state"]))
    job.message, job.step, job.loss = doc["message"], doc["step"], doc["loss"]
    job.generations_started = doc["generations_started"]
    job.steps_lost, job.step_at_failure = doc["steps_lost"], doc["step_at_failure"]
    job.last_step_s = job.saved_s = now_s
    job.evicted = {_card_ref(c): _evidence_back(e) for c, e in doc["evicted"].items()}
    job.drain_requests = {_card_ref(c): _evidence_back(e) for c, e in doc["drain_requests"].items()}
    job.readmit_requests = {_card_ref(c): _evidence_back(e) for c, e in doc.get("readmit_requests", {}).items()}
    job.measured_speed = {_card_ref(c): s for c, s in doc["measured_speed"].items()}
    job.measured_link_mbit = dict(doc["measured_link_mbit"])
    job.blamed_errors = {sig: tuple(map(_card_ref, cards)) for sig, cards in doc["blamed_errors"].items()}
    job.incidents = [json_format.ParseDict(i, pb.Incident()) for i in doc["incidents"]]
    stored = doc["generation"]
    if stored is not None and not stored["ended"]:
        ranks = tuple(RankSlot(**slot) for slot in stored["ranks"])
        layout = ParallelLayout.from_json(stored["layout"]) if stored["layout"] else None
        job.generation = Generation(stored["number"], ranks, layout, started_s=now_s, last_progress_s=now_s,
                                    state=GenState.RUNNING)
        job.generation.committed_step = stored["committed_step"]
        job.generation.saves_failed = stored.get("saves_failed", 0)  # absent in documents before it existed
    nodes = [
        NodeRecord(name, n["host"], tuple(CardRecord(**c) for c in n["cards"]), agent_pid=0,
                   last_heartbeat_s=now_s, registered_s=now_s, connected=False, restored=True)
        for name, n in doc["nodes"].items()
    ]  # fmt: skip
    return job, nodes


def newest(documents: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The job a new coordinator takes on: the newest stored one. If it has not ended it is carried
    on; if it has, it is kept to answer a launcher that lost the final event in the failover."""
    jobs = [d for key, d in documents.items() if key.count("/") == 1 and "state" in d]
    return max(jobs, key=lambda d: d.get("saved_unix_s", 0.0), default=None)
