"""The bridge between a job and the planner: the job's cluster, model and batch as the planner's
plain types, and the search's plan back as the rank slots a generation runs. The planner itself is
a pure library (`hyrun.planner`) and knows nothing of jobs or processes.

The worker runs every plan the search returns (`hyrun.runtime.parallel`): five degrees, uneven
layer counts per pipeline stage, uneven micro-batch counts per data-parallel replica and the plan's
expert placement.

`check_job` is the pre-launch gate: whatever a generation's start would refuse is refused before any
process starts (by `hyrun launch`, `hyrun plan` and the coordinator's submit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

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
from hyrun.planner.cards import CARD_CATALOGUE
from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.coordinator.generation import RankPlan, RankSlot
from hyrun.runtime.jobfile import JobFileError, JobSpec
from hyrun.runtime.parallel.layout import ParallelLayout


def planner_inputs(job: JobSpec) -> tuple[Cluster, ModelShape, TrainingConfig]:
    cluster = cluster_from_job(job.cluster.nodes, job.cluster.card_types)
    training = TrainingConfig(micro_batch_size=job.training.micro_batch, global_batch_sequences=job.training.global_batch)
    return cluster, ModelShape.from_config(job.model.config(), seq_len=job.training.seq_len), training


def card_ids(cluster: Cluster) -> dict[CardRef, int]:
    return {CardRef(card.node, card.local_index): card.global_id for card in cluster.cards}


@dataclass(frozen=True)
class Measured:
    """What a running job measured that the job file does not say: stragglers' speeds, and the
    inter-node bandwidth of congested links (Mbit/s per node, for every card on it)."""

    speed: Mapping[CardRef, float] = field(default_factory=dict)
    link_mbit: Mapping[str, float] = field(default_factory=dict)

    def apply(self, cluster: Cluster) -> Cluster:
        ids = card_ids(cluster)
        specs = {}
        for card, speed in self.speed.items():
            if card in ids:
                specs[ids[card]] = dataclasses.replace(cluster.card(ids[card]).spec, speed=speed)
        for card in cluster.cards:
            if card.node in self.link_mbit:
                spec = specs.get(card.global_id, card.spec)
                bandwidth = min(spec.inter_node_bandwidth_bytes_per_s, self.link_mbit[card.node] * 1e6 / 8)
                specs[card.global_id] = dataclasses.replace(spec, inter_node_bandwidth_bytes_per_s=bandwidth)
        return cluster.with_specs(specs) if specs else cluster


def plan_job(
    job: JobSpec,
    *,
    excluded: set[CardRef] | frozenset[CardRef] = frozenset(),
    data_parallel_only: bool = False,
    measured: Measured | None = None,
) -> SearchResult:
    """The planner's search for this job, without the excluded cards and with what the run measured
    (stragglers' speeds, congested links' bandwidth). Explicit degrees in the job constrain it (dp
    only while every card is usable: after a loss the other degrees stay and dp shrinks to what is
    left). Raises ValueError (with what is short) when no plan fits."""
    cluster, shape, training = planner_inputs(job)
    ids = card_ids(cluster)
    if measured is not None:
        cluster = measured.apply(cluster)
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
    measured: Measured | None = None,
) -> Plan:
    """The plan a generation runs: the search's best, or with `parallelism.split: even` the uniform
    plan of the job's degrees. Raises ValueError (with what is short) when none fits."""
    if job.parallelism == "auto" or job.parallelism.split == "planned":
        return plan_job(job, excluded=excluded, measured=measured).best
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
    return RankPlan(tuple(slots), layout, plan.step_time_s)


# A planner error can quote whole per-rank tuples; the user needs the reason, not every entry.
_REASON_CHARS = 600


def check_job(job: JobSpec) -> None:
    """Refuses, before any process starts, a job that no generation could start: a card type neither in
    the catalogue nor in `cluster.card_types`, a model that fits no card's memory, explicit degrees that
    fit no layout, fewer micro-batches than the layout needs. Runs the same planning a generation start
    runs. Raises JobFileError naming the field, its value and what is allowed."""
    known = sorted(set(CARD_CATALOGUE) | set(job.cluster.card_types))
    for n, node in enumerate(job.cluster.nodes):
        for g, group in enumerate(node.cards):
            if group.type not in known:
                raise JobFileError(f"cluster.nodes.{n}.cards.{g}.type: unknown card type {group.type!r} (node "
                                   f"{node.name}); known types: {', '.join(known)}; declare others in "
                                   "cluster.card_types")
    try:
        plan = plan_for_run(job)
        rank_plan(plan, planner_inputs(job)[0], {})  # the layout every rank would build, checked the same way
    except ValueError as error:
        reason = str(error)
        if len(reason) > _REASON_CHARS:
            reason = reason[:_REASON_CHARS] + " ..."
        raise JobFileError(f"{_planned(job)} fits no layout of the job's {job.cluster.card_count} cards: {reason}") from None


def _planned(job: JobSpec) -> str:
    """The fields the planner was given, as the user wrote them."""
    parts = [f"model.preset={job.model.preset!r}"]
    if job.model.overrides:
        parts.append(f"model.overrides={job.model.overrides}")
    t = job.training
    parts.append(f"training.global_batch={t.global_batch}, micro_batch={t.micro_batch}, seq_len={t.seq_len}")
    if job.parallelism != "auto":
        given = ", ".join(f"{k}={v}" for k, v in job.parallelism.degrees().items() if v)
        parts.append(f"parallelism {{{given or 'all 0'}}} (split: {job.parallelism.split})")
    return "; ".join(parts)
