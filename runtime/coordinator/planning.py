"""The bridge between a job and the planner: the job's cluster, model and batch as the planner's
plain types, and the search's plan back as the rank slots a generation runs. The planner itself is
a pure library (`hyrun.planner`) and knows nothing of jobs or processes.

The worker runs every plan the search returns (`hyrun.runtime.parallel`): five degrees, uneven
layer counts per pipeline stage, uneven micro-batch counts per data-parallel replica and the plan's
expert placement.
"""

from __future__ import annotations

import dataclasses

from hyrun.planner import (
    DATA_PARALLEL_ONLY,
    Cluster,
    DegreeConstraints,
    naive_plan,
    ModelShape,
    Plan,
    SearchResult,
    TrainingConfig,
    cluster_from_job,
    search,
)
from hyrun.runtime.coordinator.generation import RankPlan, RankSlot
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.parallel.layout import ParallelLayout


def planner_inputs(job: JobSpec) -> tuple[Cluster, ModelShape, TrainingConfig]:
    cluster = cluster_from_job(job.cluster.nodes, job.cluster.card_types)
    training = TrainingConfig(micro_batch_size=job.training.micro_batch, global_batch_sequences=job.training.global_batch)
    return cluster, ModelShape.from_config(job.model.config(), seq_len=job.training.seq_len), training


def card_ids(cluster: Cluster) -> dict[CardRef, int]:
    return {CardRef(card.node, card.local_index): card.global_id for card in cluster.cards}


def plan_job(
    job: JobSpec,
    *,
    excluded: set[CardRef] | frozenset[CardRef] = frozenset(),
    data_parallel_only: bool = False,
    measured_speed: dict[CardRef, float] | None = None,
) -> SearchResult:
    """The planner's search for this job, without the excluded cards and with the speeds measured
    for stragglers. Explicit degrees in the job constrain it (dp only while every card is usable:
    after a loss the other degrees stay and dp shrinks to what is left). Raises ValueError (with
    what is short) when no plan fits."""
    cluster, shape, training = planner_inputs(job)
    ids = card_ids(cluster)
    if measured_speed:
        cluster = cluster.with_specs(
            {ids[card]: dataclasses.replace(cluster.card(ids[card]).spec, speed=speed) for card, speed in measured_speed.items() if card in ids}
        )
    return search(
        cluster,
        shape,
        training,
        excluded={ids[card] for card in excluded if card in ids},
        constraints=DATA_PARALLEL_ONLY if data_parallel_only else job_constraints(job, all_cards=not excluded),
    )


def plan_for_run(
    job: JobSpec,
    *,
    excluded: set[CardRef] | frozenset[CardRef] = frozenset(),
    measured_speed: dict[CardRef, float] | None = None,
) -> Plan:
    """The plan a generation runs: the search's best, or with `parallelism.split: even` the uniform
    plan of the job's degrees. Raises ValueError (with what is short) when none fits."""
    if job.parallelism == "auto" or job.parallelism.split == "planned":
        return plan_job(job, excluded=excluded, measured_speed=measured_speed).best
    cluster, shape, training = planner_inputs(job)
    ids = card_ids(cluster)
    plan = naive_plan(cluster, shape, training, excluded={ids[card] for card in excluded if card in ids},
                      constraints=job_constraints(job, all_cards=not excluded))
    if plan is None:
        raise ValueError("no even layout of these degrees fits the cards")
    return plan


def job_constraints(job: JobSpec, *, all_cards: bool = True) -> DegreeConstraints | None:
    """The degrees a job file fixes (None for `parallelism: auto`)."""
    if job.parallelism == "auto":
        return None
    degrees = job.parallelism.degrees()
    if not all_cards:
        degrees["dp"] = 0
    return DegreeConstraints.fixed(**degrees)


def rank_plan(plan: Plan, cluster: Cluster, speeds: dict[CardRef, float]) -> RankPlan:
    """The plan as a generation runs it: a slot per rank (its card, speed and its replica's
    micro-batches) and the layout every rank builds."""
    layout = ParallelLayout.from_plan(plan)
    by_id = {card.global_id: card for card in cluster.cards}
    slots = []
    for rank, card_id in enumerate(plan.rank_to_card):
        card = by_id[card_id]
        ref = CardRef(card.node, card.local_index)
        slots.append(
            RankSlot(rank, card.node, card.local_index, card.spec.name, speeds.get(ref, card.spec.speed), layout.micro_batches(rank))
        )
    return RankPlan(tuple(slots), layout)
