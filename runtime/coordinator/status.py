"""What the coordinator shows of a job: the JobEvent that `hyrun status`, the launcher's live
view and watchers receive, built from the job record and membership (read only)."""

from __future__ import annotations

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.coordinator.membership import Membership
from hyrun.runtime.coordinator.records import JobRecord


def node_states(job: JobRecord | None, membership: Membership) -> list[pb.NodeState]:
    gen = job.generation if job else None
    training = set(gen.nodes) if gen is not None and not gen.ended else set()
    states = []
    for node in membership.nodes.values():
        state = "lost" if not node.alive else "training" if node.name in training else "idle"
        states.append(pb.NodeState(node=node.name, alive=node.alive, cards=len(node.cards), state=state))
    return states


def job_event(job: JobRecord, membership: Membership) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=job.job_id,
        state=job.state.value,
        generation=job.generation.number if job.generation else 0,
        step=job.step,
        total_steps=job.spec.training.steps,
        loss=job.loss,
        tokens_per_s=job.tokens_per_s,
        step_time_s=job.step_time_s,
        nodes=node_states(job, membership),
        message=job.message,
        evictions=[f"{card}: {evidence.describe()}" for card, evidence in job.evicted.items()],
        steps_lost=job.steps_lost,
        incidents=job.incidents,
        ranks=_rank_states(job),
        layout=job.generation.layout.describe() if job.generation else "",
        eval_step=job.evals.newest.step if job.evals.newest else 0,
        eval_loss=job.evals.newest.mean_loss if job.evals.newest else 0.0,
    )


def _rank_states(job: JobRecord) -> list[pb.RankState]:
    gen = job.generation
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
