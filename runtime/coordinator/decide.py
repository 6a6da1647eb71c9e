"""The coordinator's one decision function: `decide(now_s, view, settings) -> [Action]`. Every
verdict and every conflict between verdicts lives here, as a pure function of a frozen view and
the time, so each rule is a table row in tests/test_decide.py. Mechanism (commands, store,
metrics, logs) is the orchestrator's.

Precedence, highest first: the job finished; a failing generation (grace, then blame or job error);
cards to evict now (lost nodes, fatal hardware errors); a hang; a drain that completed or timed
out; new drains (heat, corruption, operator, joins; a straggler only when nothing else drains).
"""

from __future__ import annotations

from hyrun.runtime.coordinator.actions import (
    Action,
    BeginDrain,
    CardRef,
    Cause,
    Evidence,
    FailJob,
    FinishJob,
    HoldEvictions,
    MarkNodeLost,
    Note,
    Quarantine,
    Readmit,
    Recover,
    ReleaseHold,
    StartJob,
    Verdict,
    VerdictKind,
)
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.link_policy import congested_links, link_back, link_down
from hyrun.runtime.coordinator.policy import (
    blame_exits,
    hang_evidence,
    hardware_error_verdict,
    hung_ranks,
    job_error_forming,
    repeated_error,
    same_job_error,
    straggler_verdicts,
    suspected_corruption,
    temperature_verdict,
)
from hyrun.runtime.coordinator.view import DecideSettings, GenerationView, NodeView, View

_FINISHING_FACTOR = 10  # a rank past the job's last step gets this many hang timeouts to exit

# Cards evicted with their node (not for a fault of their own) come back when the node does.
NODE_LOSS_CAUSES = frozenset({Cause.NODE_SILENT, Cause.NODE_DISCONNECTED})


def decide(now_s: float, view: View, settings: DecideSettings) -> list[Action]:
    job = view.job
    if job is None or job.state in (JobState.COMPLETED, JobState.FAILED):
        return []
    lost, actions = _liveness(now_s, view, settings)
    actions += [MarkNodeLost(name, evidence) for name, evidence in lost.items()]
    if job.state is JobState.PENDING:
        return actions + _pending(now_s, view, settings)
    gen = job.generation
    if gen is None or gen.state in (GenState.COMPLETED, GenState.STOPPED):
        return actions
    if len(gen.exited_ok) == gen.world_size:
        elapsed_s = now_s - job.submitted_s
        return actions + [FinishJob(Evidence.of(Cause.FINISHED, steps=job.step, elapsed_s=elapsed_s))]
    return actions + _running(now_s, view, gen, lost, settings)


def _pending(now_s: float, view: View, settings: DecideSettings) -> list[Action]:
    job = view.job
    missing = [n for n in job.node_names if n not in view.nodes or not view.nodes[n].alive]
    if not missing:
        return [StartJob()]
    waited_s = now_s - job.submitted_s
    if waited_s > settings.node_wait_timeout_s:
        return [FailJob((Evidence.of(Cause.NODES_MISSING, nodes=", ".join(missing), waited_s=waited_s),))]
    return []


def _running(
    now_s: float, view: View, gen: GenerationView, lost: dict[str, Evidence], settings: DecideSettings
) -> list[Action]:
    job = view.job
    cut = [
        Verdict(VerdictKind.EVICT, card, e)
        for card in gen.cards
        if card.node not in lost and (e := link_down(card.node, view.data_nics.get(card.node, ())))
    ]
    if gen.failing_since is not None:
        return _failing(now_s, view, gen, cut, settings)
    evictions = [
        Verdict(VerdictKind.EVICT, card, lost[card.node]) for card in gen.cards if card.node in lost
    ]
    evictions += _hardware(view, gen, settings) + cut
    if evictions:
        if not job.fault_tolerance:
            return [FailJob(_why(evictions))]
        return [Recover(gen.drain_verdicts + tuple(evictions), _why(evictions))]
    if gen.state in (GenState.RUNNING, GenState.DRAINING):
        silent_s = now_s - max(gen.last_progress_s, view.stalled_until_s)
        finishing = len(gen.steps_by_rank) == gen.world_size and min(gen.steps_by_rank.values()) >= job.total_steps
        # Past the last step, ranks write their final checkpoint and tear down: no step comes to time them.
        if silent_s > settings.hang_timeout_s * (_FINISHING_FACTOR if finishing else 1):
            return [_hang(gen, silent_s, job.fault_tolerance)]
    if gen.state is GenState.DRAINING:
        if gen.committed_step > gen.drain_after_step:
            evidence = _why(gen.drain_verdicts)
            return [Recover(gen.drain_verdicts, evidence, committed_step=gen.committed_step)]
        if now_s > gen.drain_deadline_s:
            timeout = Evidence.of(Cause.DRAIN_TIMEOUT, timeout_s=settings.drain_timeout_s)
            return [Recover(gen.drain_verdicts, (timeout,) + _why(gen.drain_verdicts))]
    return _drains(now_s, view, gen, settings)


def _failing(
    now_s: float, view: View, gen: GenerationView, cut: list[Verdict], settings: DecideSettings
) -> list[Action]:
    """A worker died: wait a short grace for its peers' exits, then name the culprit — or, when every
    rank failed the same way, fail the job without blaming any card. A node whose data link lost
    carrier is the culprit whatever its peers' errors say: they failed (all alike, often) because
    they could not reach it."""
    failures = list(gen.failures)
    if not view.job.fault_tolerance:
        return [FailJob((failures[0].evidence,))]
    waited_s = now_s - gen.failing_since
    if waited_s < settings.failure_grace_s:
        return []
    if cut:
        return [Recover(gen.drain_verdicts + tuple(cut), _why(cut))]
    job_error = same_job_error(failures, gen.world_size)
    if job_error is not None:
        why = "every rank failed the same way"
        return [FailJob((Evidence.of(Cause.JOB_ERROR, why=why, reason=job_error.evidence.describe()),))]
    if job_error_forming(failures) and waited_s < settings.job_error_wait_s:
        return []
    gone = sorted(n for n in gen.nodes if n in view.nodes and not view.nodes[n].connected)
    actions: list[Action] = []
    if gone:
        verdicts = []
        for name in gone:
            evidence = Evidence.of(Cause.NODE_DISCONNECTED, node=name)
            actions.append(MarkNodeLost(name, evidence))  # do not plan on it until its agent registers again
            verdicts += [Verdict(VerdictKind.EVICT, card, evidence) for card in gen.cards if card.node == name]
    else:
        verdicts = blame_exits(failures)
        culprits = [f for f in failures if f.card in {v.card for v in verdicts}]
        if repeated_error(culprits, dict(view.job.blamed_errors)):
            # The error followed the work to another card: release the cards blamed for it before.
            earlier = tuple(dict.fromkeys(c for f in culprits for c in view.job.blamed_errors[f.error_signature]))
            why = f"the same error followed the work from {', '.join(map(str, earlier))} to {culprits[0].card}"
            job_error = Evidence.of(Cause.JOB_ERROR, why=why, reason=culprits[0].evidence.describe())
            return [Readmit(earlier, job_error), FailJob((job_error,))]
    return actions + [Recover(gen.drain_verdicts + tuple(verdicts), _why(verdicts))]


def _hang(gen: GenerationView, silent_s: float, fault_tolerance: bool) -> Action:
    ranks = hung_ranks(dict(gen.steps_by_rank), dict(gen.reduce_entered), gen.world_size)
    if ranks is None:  # nobody to single out: restart the generation on the same cards
        stuck = Evidence.of(Cause.STUCK, generation=gen.number, silent_s=silent_s)
        return Recover(gen.drain_verdicts, (stuck,)) if fault_tolerance else FailJob((stuck,))
    verdicts = tuple(
        Verdict(VerdictKind.EVICT, gen.ranks[r].card, hang_evidence(r, gen.steps_by_rank.get(r, 0), silent_s))
        for r in ranks
    )
    if not fault_tolerance:
        return FailJob(_why(verdicts))
    return Recover(gen.drain_verdicts + verdicts, _why(verdicts))


def _hardware(view: View, gen: GenerationView, settings: DecideSettings) -> list[Verdict]:
    verdicts = []
    for card in gen.cards:
        health = view.health.get(card)
        if health is not None:
            verdict = hardware_error_verdict(card, list(health.xids), health.ecc_new, settings.health)
            if verdict is not None:
                verdicts.append(verdict)
    return verdicts


def _drains(now_s: float, view: View, gen: GenerationView, settings: DecideSettings) -> list[Action]:
    """Cards that should leave (or join) without losing a step: checkpoint first."""
    job = view.job
    cards = gen.cards
    verdicts: list[Verdict] = []
    for card in cards:
        health = view.health.get(card)
        if health is not None:
            hot = temperature_verdict(card, list(health.temperatures), health.slowdown_c, settings.health)
            verdicts += [hot] if hot is not None else []
    latest = max(gen.nonfinite_by_step, default=0)
    corrupt = suspected_corruption({s: dict(r) for s, r in gen.nonfinite_by_step.items()}, latest, settings.health)
    verdicts += [Verdict(VerdictKind.DRAIN, gen.ranks[rank].card, evidence) for rank, evidence in corrupt.items()]
    verdicts += [Verdict(VerdictKind.DRAIN, card, evidence) for card, evidence in job.drain_requests.items() if card in cards]
    congested = congested_links({n: view.data_nics[n] for n in gen.nodes if n in view.data_nics}, settings.health)
    for card in cards:
        if card.node in congested:
            kind, evidence = congested[card.node]
            if not _replanned_at(job, card.node, kind, evidence):
                verdicts.append(Verdict(kind, card, evidence))
    actions: list[Action] = []
    outside = tuple(card for card in job.drain_requests if card not in cards)
    if outside:
        actions.append(Quarantine(outside, job.drain_requests[outside[0]]))
    actions += _idle_links_down(view, gen)
    joins, readmit = _joins(view, gen)
    if readmit:
        actions.append(Readmit(tuple(readmit), Evidence.of(Cause.NODE_JOINED, node=readmit[0].node, cards=len(readmit))))
    verdicts += joins
    if not verdicts and not gen.drain_verdicts:
        # A card already leaving, or one whose gradients look corrupt, is not also a straggler.
        believed = {card: job.measured_speed.get(card, slot.speed) for card, slot in cards.items()}
        windows = {card: list(times) for card, times in gen.seconds_per_micro_batch.items() if card in cards}
        verdicts = straggler_verdicts(windows, {c: s.card_type for c, s in cards.items()}, believed, settings.health)
    already = {v.card for v in gen.drain_verdicts}
    fresh = _first_per_card(v for v in verdicts if v.card not in already)
    if not fresh or not job.fault_tolerance:
        return actions
    if not job.checkpoints or gen.state is GenState.STARTING:
        # No checkpoint to wait for (none configured, or no step trained yet): leave now.
        return actions + [Recover(gen.drain_verdicts + fresh, _why(fresh))]
    return actions + [BeginDrain(fresh)]


def _replanned_at(job, node: str, kind: VerdictKind, evidence: Evidence) -> bool:
    """A replan for a congested link the plan already expects (measured at no more than 1.25x the
    pace seen now): replanning again would only cost a checkpoint."""
    known = job.measured_link_mbit.get(node)
    return kind is VerdictKind.REPLAN and known is not None and evidence["mbit"] >= 0.8 * known


def _idle_links_down(view: View, gen: GenerationView) -> list[Action]:
    """A node left out of this generation whose data link lost carrier: keep it out of the next plan
    too (a generation started on it would only fail to connect); it rejoins when the link is back."""
    job, actions = view.job, []
    for name in job.node_names:
        node = view.nodes.get(name)
        if node is None or not node.alive or not node.connected or name in gen.nodes:
            continue
        fresh = tuple(c for c in _refs(node) if c not in job.evicted)
        if fresh and (evidence := link_down(name, view.data_nics.get(name, ()))):
            actions.append(Quarantine(fresh, evidence))
    return actions


def _joins(view: View, gen: GenerationView) -> tuple[list[Verdict], list]:
    """Nodes of the job that registered after this generation started and are not in it (a lost
    node's agent came back, a node started late) join at the next checkpoint. Cards evicted with
    their node come back; cards evicted for a fault of their own stay out."""
    job = view.job
    verdicts, readmit = [], []
    for name in job.node_names:
        node = view.nodes.get(name)
        if node is None or not node.alive or not node.connected or name in gen.nodes:
            continue
        cards = _refs(node)
        relinked = [c for c in cards if c in job.evicted and job.evicted[c].cause is Cause.LINK_DOWN
                    and link_back(name, view.data_nics.get(name, ()))]
        if node.registered_s <= gen.started_s and not relinked:
            continue  # left out of this generation on purpose
        back = [c for c in cards if c in job.evicted and job.evicted[c].cause in NODE_LOSS_CAUSES] + relinked
        usable = [c for c in cards if (c not in job.evicted or c in back) and c not in job.drain_requests]
        if usable:
            readmit += back
            evidence = Evidence.of(Cause.NODE_JOINED, node=name, cards=len(usable))
            if relinked:
                evidence = Evidence.of(Cause.LINK_BACK, node=name, interface=view.data_nics[name][-1].interface)
            verdicts.append(Verdict(VerdictKind.JOIN, usable[0], evidence))
    # Cards an operator gave back (repaired) join at the next checkpoint, if their node is up.
    for card, evidence in job.readmit_requests.items():
        node = view.nodes.get(card.node)
        if card not in gen.cards and node is not None and node.alive and node.connected:
            verdicts.append(Verdict(VerdictKind.JOIN, card, evidence))
    return verdicts, readmit


def _liveness(now_s: float, view: View, settings: DecideSettings) -> tuple[dict[str, Evidence], list[Action]]:
    """Nodes whose lease ran out, counted from the end of the coordinator's own last stall (its lag
    is never charged to agents). When most of the job's nodes go silent at once, suspect the
    coordinator or the network and hold for a bounded time; a node whose peers keep completing
    steps with it is not dead, only quiet."""
    job, gen = view.job, view.job.generation if view.job else None
    starting = gen is not None and gen.state is GenState.STARTING
    silent: dict[str, float] = {}
    notes: list[Action] = []
    for node in view.nodes.values():
        if not node.alive:
            continue
        in_start = (starting and node.name in gen.nodes) or now_s - node.registered_s < settings.node_startup_grace_s
        lease_s = settings.node_startup_grace_s if in_start else settings.heartbeat_timeout_s
        silent_s = now_s - max(node.last_heartbeat_s, view.stalled_until_s)
        if silent_s <= lease_s:
            continue
        progress = _progress_without(node, gen)
        if progress is not None:
            evidence = Evidence.of(Cause.SILENT_WITH_PROGRESS, node=node.name, silent_s=silent_s,
                                   peer_step=progress[0], own_step=progress[1])
            notes.append(Note(evidence))
            continue
        if _moving_since_silent(node, gen, now_s, lease_s):
            continue  # its peers' steps go on; a dead node would stop them within a step: wait for proof
        silent[node.name] = silent_s
    in_job = [n for n in silent if job is not None and n in job.node_names]
    total = len(job.node_names) if job is not None else len(view.nodes)
    mass = len(in_job) >= settings.mass_silence_min_nodes and len(in_job) > settings.mass_silence_share * total
    if mass:
        if view.hold_since_s is None:
            hold = Evidence.of(Cause.MASS_SILENCE, silent=len(in_job), nodes=total, hold_s=settings.mass_silence_hold_s)
            return {}, notes + [HoldEvictions(hold, now_s)]
        if now_s - view.hold_since_s < settings.mass_silence_hold_s:
            return {}, notes
    elif view.hold_since_s is not None:
        notes.append(ReleaseHold())
    lost = {name: Evidence.of(Cause.NODE_SILENT, node=name, silent_s=silent_s) for name, silent_s in silent.items()}
    return lost, notes


def _moving_since_silent(node: NodeView, gen: GenerationView | None, now_s: float, lease_s: float) -> bool:
    """The generation made progress after this node fell silent, and recently: the node may only have
    lost its control link (its collectives still run). A dead node stalls every collective, so this
    holds for at most one lease after it dies."""
    if gen is None or gen.state not in (GenState.RUNNING, GenState.DRAINING) or node.name not in gen.nodes:
        return False
    return gen.last_progress_s > node.last_heartbeat_s and now_s - gen.last_progress_s <= lease_s


def _progress_without(node: NodeView, gen: GenerationView | None) -> tuple[int, int] | None:
    """(peers' step, its own last step) when ranks on other nodes completed steps that needed this
    node's ranks (a step's collectives span every rank: peers can run at most one step ahead of a
    dead rank), else None."""
    if gen is None or gen.state not in (GenState.RUNNING, GenState.DRAINING) or node.name not in gen.nodes:
        return None
    own = [gen.steps_by_rank.get(s.rank, 0) for s in gen.ranks if s.node == node.name]
    peers = [gen.steps_by_rank.get(s.rank, 0) for s in gen.ranks if s.node != node.name]
    if not peers or max(peers) <= min(own) + 1:
        return None
    return max(peers), min(own)


def _refs(node: NodeView) -> list[CardRef]:
    return [CardRef(node.name, index) for index in node.cards]


def _first_per_card(verdicts) -> tuple[Verdict, ...]:
    seen, kept = set(), []
    for verdict in verdicts:
        if verdict.card not in seen:
            seen.add(verdict.card)
            kept.append(verdict)
    return tuple(kept)


def _why(verdicts) -> tuple[Evidence, ...]:
    """Each distinct piece of evidence once (a lost node's cards share one)."""
    return tuple(dict.fromkeys(v.evidence for v in verdicts))
