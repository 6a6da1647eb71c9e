"""Which card runs which rank in the next generation: the planner's plan over the usable cards
(live nodes, not evicted), or an even data-parallel split where the planner finds none."""

from __future__ import annotations

import logging

from hyrun.runtime.coordinator.actions import CardRef
from hyrun.runtime.coordinator.generation import RankPlan, RankSlot
from hyrun.runtime.coordinator.membership import Membership
from hyrun.runtime.jobfile import JobSpec
from hyrun.runtime.parallel.layout import ParallelLayout
from hyrun.runtime.coordinator.planning import Measured, plan_for_run, planner_inputs, rank_plan

log = logging.getLogger("hyrun.coordinator")


def assign_ranks(
    spec: JobSpec, membership: Membership, excluded: frozenset[CardRef] | set[CardRef] = frozenset()
) -> RankPlan:
    """Plain data parallelism: one rank per usable card (live node, not evicted), nodes in job-file
    order, micro-batches split as evenly as whole numbers allow (the first ranks take the rest)."""
    cards = [
        (name, card)
        for name in (n.name for n in spec.cluster.nodes)
        if name in membership.nodes and membership.nodes[name].alive and membership.nodes[name].connected
        for card in membership.nodes[name].cards
        if CardRef(name, card.index) not in excluded
    ]
    if not cards:
        return RankPlan((), None)
    total = spec.training.micro_batches_per_step
    base, extra = divmod(total, len(cards))
    slots = tuple(
        RankSlot(rank, node, card.index, card.type, card.speed, base + (1 if rank < extra else 0))
        for rank, (node, card) in enumerate(cards)
    )
    return RankPlan(slots, ParallelLayout.data_parallel([slot.micro_batches for slot in slots]))


def plan_ranks(
    spec: JobSpec,
    membership: Membership,
    excluded: frozenset[CardRef] | set[CardRef] = frozenset(),
    measured: Measured | None = None,
) -> RankPlan:
    """The ranks of the next generation on the usable cards: the planner's plan (`parallelism: auto`:
    any layout, each card's work in proportion to its capability; explicit degrees: those degrees,
    with dp shrunk to the cards left after a loss), or, for `auto` where the planner finds none, an
    even data-parallel split (it says why in the log). Raises ValueError when explicit degrees no
    longer fit."""
    even = assign_ranks(spec, membership, excluded)
    if not even.slots:
        return even
    usable = {CardRef(s.node, s.card_index) for s in even.slots}
    cluster, _, _ = planner_inputs(spec)
    unusable = {CardRef(c.node, c.local_index) for c in cluster.cards} - usable
    speeds = {CardRef(s.node, s.card_index): s.speed for s in even.slots}
    try:
        plan = plan_for_run(spec, excluded=unusable, measured=measured)
    except (ValueError, KeyError) as error:
        if spec.parallelism != "auto":
            raise ValueError(f"the job's parallelism {spec.parallelism.degrees()} does not fit the "
                             f"{len(usable)} usable cards: {error}") from None
        log.warning("planner found no plan (%s); splitting the batch evenly", error)
        return even
    return rank_plan(plan, cluster, speeds)
