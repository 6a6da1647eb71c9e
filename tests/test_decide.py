"""decide(), one table row per rule and per conflict between rules: a hand-built View, a time,
and the actions expected (kind, card, cause). No processes, no clocks, no orchestrator."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from hyrun.runtime.coordinator.actions import (
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
    StartJob,
    Verdict,
    VerdictKind,
)
from hyrun.runtime.coordinator.decide import decide
from hyrun.runtime.coordinator.generation import RankSlot
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.policy import RankFailure
from hyrun.runtime.jobfile import HealthSection
from hyrun.runtime.coordinator.view import CardHealthView, DecideSettings, GenerationView, JobView, NicSampleView, NodeView, View

NODES = ("a", "b", "c", "d")  # two cards each; ranks 0..7 in node order
SETTINGS = DecideSettings(
    heartbeat_timeout_s=2.0, node_startup_grace_s=6.0, node_wait_timeout_s=30.0, failure_grace_s=0.5,
    job_error_wait_s=5.0, drain_timeout_s=20.0, hang_timeout_s=10.0, mass_silence_hold_s=30.0,
    health=HealthSection(overflow_strikes=2, overflow_window_steps=5, straggler_window_steps=3),
)  # fmt: skip
SLOTS = tuple(RankSlot(r, NODES[r // 2], r % 2, "cpu-sim", 1.0, 1) for r in range(8))
NOW = 100.0


def card(node: str, index: int = 0) -> CardRef:
    return CardRef(node, index)


def nodes(silent: dict[str, float] | None = None, **overrides) -> dict[str, NodeView]:
    """Every node registered at 0 and beating until NOW, except `silent` (name -> last beat)."""
    silent = silent or {}
    views = {n: NodeView(n, True, True, silent.get(n, NOW), 0.0, (0, 1)) for n in NODES}
    for name, changes in overrides.items():
        views[name] = replace(views[name], **changes)
    return views


def gen(state=GenState.RUNNING, **fields) -> GenerationView:
    defaults = dict(number=3, state=state, ranks=SLOTS, started_s=10.0, last_progress_s=NOW - 1,
                    steps_by_rank={r: 7 for r in range(8)})  # fmt: skip
    return GenerationView(**{**defaults, **fields})


def view(generation=None, *, job_state=JobState.RUNNING, nodes_=None, health=None, nics=None, **job_fields) -> View:
    job = JobView(state=job_state, node_names=NODES, submitted_s=0.0, step=7, total_steps=50,
                  generation=generation if generation is not None else (gen() if job_state is JobState.RUNNING else None),
                  **job_fields)  # fmt: skip
    return View(job, nodes_ if nodes_ is not None else nodes(), health or {}, data_nics=nics or {})


def nic_samples(mbit_then: float, mbit_now: float, *, queued_now: bool, carrier: bool = True) -> tuple:
    """Ten heartbeats 1 s apart: five at `mbit_then`, five at `mbit_now` (egress queue holding back or not)."""
    out, tx, held = [NicSampleView(NOW - 10, "data0", True, 0, 0, 0)], 0, 0
    for i, rate in enumerate([mbit_then] * 5 + [mbit_now] * 5, start=1):
        tx, held = tx + int(rate * 1e6 / 8), held + (3 if queued_now and i > 5 else 0)
        out.append(NicSampleView(NOW - 10 + i, "data0", carrier or i < 10, tx, held, 0))
    return tuple(out)


def link_view(**per_node) -> View:
    """Nodes a..d with healthy data links at 50 Mbit/s unless given."""
    healthy = nic_samples(50, 50, queued_now=False)
    return view(nics={n: per_node.get(n, healthy) for n in NODES})


def failure(rank: int, code: int, reason: str, at: float) -> RankFailure:
    return RankFailure(rank, SLOTS[rank].card, "cpu-sim", code, reason, at)


def hot(c: float = 88.0, **more) -> CardHealthView:
    return CardHealthView(temperatures=((NOW, c),), slowdown_c=90.0, **more)


def drain(kind: VerdictKind, c: CardRef, cause: Cause) -> Verdict:
    return Verdict(kind, c, Evidence.of(cause))


def summary(actions) -> list[tuple]:
    """Actions as comparable rows: (action, {(verdict kind, card, cause)}) or (action, cause/node)."""
    rows = []
    for a in actions:
        if isinstance(a, (Recover, BeginDrain)):
            rows.append((type(a).__name__, frozenset((v.kind.value, str(v.card), v.evidence.cause.value) for v in a.verdicts)))
        elif isinstance(a, MarkNodeLost):
            rows.append(("MarkNodeLost", a.node, a.evidence.cause.value))
        elif isinstance(a, (FailJob,)):
            rows.append(("FailJob", tuple(e.cause.value for e in a.evidence)))
        elif isinstance(a, (HoldEvictions, Note, FinishJob)):
            rows.append((type(a).__name__, a.evidence.cause.value))
        elif isinstance(a, (Quarantine, Readmit)):
            rows.append((type(a).__name__, tuple(map(str, a.cards))))
        else:
            rows.append((type(a).__name__,))
    return rows


def R(*verdicts):  # noqa: N802 - reads as a table cell
    return frozenset(verdicts)


EXIT_KILL = "killed by SIGKILL"
NOT_A_DIR = "exited with code 1: error: NotADirectoryError: [Errno 20] Not a directory: '/ckpt'"
EXIT_PEER = "exited with code 1: RuntimeError: [gloo] Connection closed by peer"
OOM = "exited with code 1: RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate {} bytes"
SILENT_B = {"b": NOW - 5.0}
STRAGGLING_D1 = {c: (0.1, 0.1, 0.1) for c in (s.card for s in SLOTS)} | {card("d", 1): (0.3, 0.3, 0.3)}
NAN_D1 = {s: {r: (r == 7) for r in range(8)} for s in (5, 6, 7)}

ROWS = [
    # --- the job's own lifecycle
    ("every node registered: start", NOW, view(job_state=JobState.PENDING), [("StartJob",)]),
    ("nodes missing past the wait: fail naming them", NOW,
     view(job_state=JobState.PENDING, nodes_={"a": nodes()["a"]}), [("FailJob", ("nodes_missing",))]),
    ("nodes missing within the wait: keep waiting", 20.0, view(job_state=JobState.PENDING, nodes_={}), []),
    ("every rank finished: the job completes", NOW,
     view(gen(exited_ok=frozenset(range(8)))), [("FinishJob", "finished")]),
    ("a finished job decides nothing", NOW, view(job_state=JobState.COMPLETED), []),
    # --- data links
    ("a data link loses carrier while its agent reports: evict the node's cards now", NOW,
     link_view(b=nic_samples(50, 50, queued_now=False, carrier=False)),
     [("Recover", R(("evict", "b/card0", "link_down"), ("evict", "b/card1", "link_down")))]),
    ("its peers failed alike because a data link died: the link's node is blamed, the job goes on", NOW,
     View(view(gen(GenState.FAILING, failing_since=NOW - 1,
                   failures=tuple(failure(r, 1, EXIT_PEER, NOW - 1) for r in range(8)))).job, nodes(), {},
          data_nics={**link_view().data_nics, "b": nic_samples(50, 50, queued_now=False, carrier=False)}),
     [("Recover", R(("evict", "b/card0", "link_down"), ("evict", "b/card1", "link_down")))]),
    ("a node left out of the generation loses its data link: kept out of the next plan, nothing stops", NOW,
     View(view(gen(ranks=SLOTS[:6], steps_by_rank={r: 7 for r in range(6)})).job, nodes(), {},
          data_nics={**link_view().data_nics, "d": nic_samples(50, 50, queued_now=False, carrier=False)}),
     [("Quarantine", ("d/card0", "d/card1"))]),
    ("a congested link far below its peers: drain the node", NOW,
     link_view(c=nic_samples(50, 5, queued_now=True)),
     [("BeginDrain", R(("drain", "c/card0", "link_congested"), ("drain", "c/card1", "link_congested")))]),
    ("a congested link not far off: replan with its bandwidth", NOW,
     link_view(c=nic_samples(50, 30, queued_now=True)),
     [("BeginDrain", R(("replan", "c/card0", "link_congested"), ("replan", "c/card1", "link_congested")))]),
    ("... unless the plan already expects that bandwidth", NOW,
     replace(link_view(c=nic_samples(50, 30, queued_now=True)),
             job=replace(link_view().job, measured_link_mbit={"c": 30.0})), []),
    ("a busy link whose queue never held back is not congested", NOW, link_view(c=nic_samples(50, 5, queued_now=False)), []),
    # --- node liveness
    ("silent past its lease, its generation stalled since: lost, its cards evicted", NOW,
     view(gen(last_progress_s=NOW - 5.5), nodes_=nodes(SILENT_B)),
     [("MarkNodeLost", "b", "node_silent"),
      ("Recover", R(("evict", "b/card0", "node_silent"), ("evict", "b/card1", "node_silent")))]),
    ("silent past its lease, but steps went on after it fell silent (a control link cut): wait", NOW,
     view(nodes_=nodes(SILENT_B)), []),
    ("silent, steps went on after it fell silent but stopped a lease ago: lost", NOW,
     view(gen(last_progress_s=NOW - 4.5), nodes_=nodes({"b": NOW - 10.0})),
     [("MarkNodeLost", "b", "node_silent"),
      ("Recover", R(("evict", "b/card0", "node_silent"), ("evict", "b/card1", "node_silent")))]),
    ("silent but its generation is starting: startup grace", NOW,
     view(gen(GenState.STARTING), nodes_=nodes(SILENT_B)), []),
    ("silent but just registered: startup grace", NOW,
     view(nodes_=nodes(SILENT_B, b={"registered_s": NOW - 5.5})), []),
    ("silent only because the coordinator stalled: not charged", NOW,
     View(view(nodes_=nodes(SILENT_B)).job, nodes(SILENT_B), {}, stalled_until_s=NOW - 1.0), []),
    ("mass silence (3 of 4): hold evictions, suspect ourselves", NOW,
     view(gen(last_progress_s=NOW - 5.5), nodes_=nodes({"a": NOW - 5, "b": NOW - 5, "c": NOW - 5})),
     [("HoldEvictions", "mass_silence")]),
    ("mass silence held within the bound: still nothing", NOW,
     View(view(gen(last_progress_s=NOW - 9.5)).job, nodes({"a": NOW - 9, "b": NOW - 9, "c": NOW - 9}), {},
          hold_since_s=NOW - 10), []),
    ("mass silence past the bound: evict after all", NOW,
     View(view(gen(steps_by_rank={}, last_progress_s=NOW - 40.5)).job, nodes({"a": NOW - 40, "b": NOW - 40, "c": NOW - 40}),
          {}, hold_since_s=NOW - 31),
     [("MarkNodeLost", "a", "node_silent"), ("MarkNodeLost", "b", "node_silent"), ("MarkNodeLost", "c", "node_silent"),
      ("Recover", R(*((("evict", f"{n}/card{i}", "node_silent") for n in "abc" for i in (0, 1)))))]),
    ("mass silence over: release the hold", NOW, View(view().job, nodes(), {}, hold_since_s=NOW - 3), [("ReleaseHold",)]),
    ("silent, but peers completed steps that needed it: not dead", NOW,
     view(gen(steps_by_rank={0: 9, 1: 9, 2: 7, 3: 7, 4: 9, 5: 9, 6: 9, 7: 9}), nodes_=nodes(SILENT_B)),
     [("Note", "silent_with_progress")]),
    # --- worker exits
    ("a worker died, within the grace: collect its peers' exits", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 0.2, failures=(failure(3, -9, EXIT_KILL, NOW - 0.2),))), []),
    ("after the grace: the killed rank is blamed, not its victims", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 1,
              failures=(failure(3, -9, EXIT_KILL, NOW - 1), failure(0, 1, EXIT_PEER, NOW - 0.9)))),
     [("Recover", R(("evict", "b/card1", "worker_exit")))]),
    ("every rank raised the same error: the job fails, no card is blamed", NOW,
     view(gen(GenState.STARTING, failing_since=NOW - 1, failures=tuple(failure(r, 1, OOM.format(r), NOW - 1) for r in range(8)))),
     [("FailJob", ("job_error",))]),
    ("the same error on some ranks so far: wait for the rest past the grace", NOW,
     view(gen(GenState.STARTING, failing_since=NOW - 1, failures=tuple(failure(r, 1, OOM.format(r), NOW - 1) for r in range(3)))),
     []),
    ("an error that cost another card its place recurs on a new card: the job is at fault, cards released", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 1, failures=(failure(2, 1, NOT_A_DIR, NOW - 1),)),
          blamed_errors={re.sub(r"\d+", "#", NOT_A_DIR): (card("a"),)}),
     [("Readmit", ("a/card0",)), ("FailJob", ("job_error",))]),
    ("the same card raising the error again is still that card's fault", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 1, failures=(failure(0, 1, NOT_A_DIR, NOW - 1),)),
          blamed_errors={re.sub(r"\d+", "#", NOT_A_DIR): (card("a"),)}),
     [("Recover", R(("evict", "a/card0", "worker_exit")))]),
    ("killed on a new card after an error elsewhere: a card fault, not the job's", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 1, failures=(failure(2, -9, EXIT_KILL, NOW - 1),)),
          blamed_errors={re.sub(r"\d+", "#", NOT_A_DIR): (card("a"),)}),
     [("Recover", R(("evict", "b/card0", "worker_exit")))]),
    ("an agent's stream closed during the failure: its node is blamed", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 1, failures=(failure(0, 1, EXIT_PEER, NOW - 1),)),
          nodes_=nodes(c={"connected": False})),
     [("MarkNodeLost", "c", "node_disconnected"),
      ("Recover", R(("evict", "c/card0", "node_disconnected"), ("evict", "c/card1", "node_disconnected")))]),
    ("fault tolerance off: the first failure fails the job, no grace", NOW,
     view(gen(GenState.FAILING, failing_since=NOW, failures=(failure(3, -9, EXIT_KILL, NOW),)), fault_tolerance=False),
     [("FailJob", ("worker_exit",))]),
    # --- card health
    ("a fatal XID: evict now", NOW, view(health={card("c", 1): CardHealthView(xids=(79,))}),
     [("Recover", R(("evict", "c/card1", "fatal_xid")))]),
    ("new uncorrectable ECC errors: evict now", NOW, view(health={card("c", 1): CardHealthView(ecc_new=2)}),
     [("Recover", R(("evict", "c/card1", "ecc")))]),
    ("near its slowdown temperature: drain (checkpoint first)", NOW, view(health={card("a"): hot()}),
     [("BeginDrain", R(("drain", "a/card0", "temperature_near")))]),
    ("hot with no checkpoints configured: leave now", NOW, view(health={card("a"): hot()}, checkpoints=False),
     [("Recover", R(("drain", "a/card0", "temperature_near")))]),
    ("hot and a fatal XID on the same card: evict wins, no drain", NOW,
     view(health={card("a"): hot(xids=(79,))}), [("Recover", R(("evict", "a/card0", "fatal_xid")))]),
    ("hot during a failure's grace: no checkpoint asked of dying workers", NOW,
     view(gen(GenState.FAILING, failing_since=NOW - 0.1, failures=(failure(3, -9, EXIT_KILL, NOW),)), health={card("a"): hot()}),
     []),
    ("already draining that card: nothing new", NOW,
     view(gen(GenState.DRAINING, drain_verdicts=(drain(VerdictKind.DRAIN, card("a"), Cause.TEMPERATURE_NEAR),),
              drain_after_step=7, drain_deadline_s=NOW + 10), health={card("a"): hot()}), []),
    # --- hangs
    ("no progress past the timeout: evict the rank that never entered the reduce", NOW,
     view(gen(last_progress_s=NOW - 11, steps_by_rank={r: 7 for r in range(8)}, reduce_entered={r: 8 for r in range(8) if r != 5})),
     [("Recover", R(("evict", "c/card1", "hang")))]),
    ("every rank stuck at the same point: restart the generation on the same cards", NOW,
     view(gen(last_progress_s=NOW - 11)), [("Recover", R())]),
    ("every rank past the last step: finishing, not hung", NOW,
     view(gen(last_progress_s=NOW - 11, steps_by_rank={r: 50 for r in range(8)})), []),
    ("no progress only because the coordinator stalled: not a hang", NOW,
     View(view(gen(last_progress_s=NOW - 11)).job, nodes(), {}, stalled_until_s=NOW - 2), []),
    # --- drains in progress
    ("the drain's checkpoint committed: leave, nothing lost", NOW,
     view(gen(GenState.DRAINING, committed_step=8, drain_after_step=7, drain_deadline_s=NOW + 10,
              drain_verdicts=(drain(VerdictKind.DRAIN, card("a"), Cause.TEMPERATURE_NEAR),))),
     [("Recover", R(("drain", "a/card0", "temperature_near")))]),
    ("the drain's checkpoint never committed: leave at the deadline", NOW,
     view(gen(GenState.DRAINING, committed_step=7, drain_after_step=7, drain_deadline_s=NOW - 1,
              drain_verdicts=(drain(VerdictKind.DRAIN, card("a"), Cause.TEMPERATURE_NEAR),))),
     [("Recover", R(("drain", "a/card0", "temperature_near")))]),
    ("a node lost mid-drain: evict now, carrying the drain along", NOW,
     view(gen(GenState.DRAINING, drain_after_step=7, drain_deadline_s=NOW + 10, last_progress_s=NOW - 5.5,
              drain_verdicts=(drain(VerdictKind.DRAIN, card("a"), Cause.TEMPERATURE_NEAR),)), nodes_=nodes(SILENT_B)),
     [("MarkNodeLost", "b", "node_silent"),
      ("Recover", R(("drain", "a/card0", "temperature_near"), ("evict", "b/card0", "node_silent"),
                    ("evict", "b/card1", "node_silent")))]),
    # --- corruption and stragglers
    ("lonely non-finite gradients, repeatedly: drain as suspected corruption", NOW,
     view(gen(nonfinite_by_step=NAN_D1)), [("BeginDrain", R(("drain", "d/card1", "corruption")))]),
    ("slower than its peers on every step: replan with its measured speed", NOW,
     view(gen(seconds_per_micro_batch=STRAGGLING_D1)), [("BeginDrain", R(("replan", "d/card1", "straggler")))]),
    ("straggler and NaN on the same card: corruption wins", NOW,
     view(gen(seconds_per_micro_batch=STRAGGLING_D1, nonfinite_by_step=NAN_D1)),
     [("BeginDrain", R(("drain", "d/card1", "corruption")))]),
    ("a straggler while another card drains: wait for the next generation", NOW,
     view(gen(GenState.DRAINING, seconds_per_micro_batch=STRAGGLING_D1, drain_after_step=7, drain_deadline_s=NOW + 10,
              drain_verdicts=(drain(VerdictKind.DRAIN, card("a"), Cause.TEMPERATURE_NEAR),))), []),
    # --- operators and joins
    ("operator drain of cards in the generation: checkpoint, then leave", NOW,
     view(drain_requests={card("b", 0): Evidence.of(Cause.OPERATOR_DRAIN, colon="", reason="")}),
     [("BeginDrain", R(("drain", "b/card0", "operator_drain")))]),
    ("operator drain of a card outside the generation: quarantine only", NOW,
     view(gen(ranks=SLOTS[:6]), drain_requests={card("d", 0): Evidence.of(Cause.OPERATOR_DRAIN, colon="", reason="")}),
     [("Quarantine", ("d/card0",))]),
    ("an operator gave a card back: it joins at a checkpoint", NOW,
     view(gen(ranks=SLOTS[:7]), readmit_requests={card("d", 1): Evidence.of(Cause.OPERATOR_READMIT, colon="", reason="")}),
     [("BeginDrain", R(("join", "d/card1", "operator_readmit")))]),
    ("a lost node registered again: readmit its cards, join at a checkpoint", NOW,
     view(gen(ranks=SLOTS[:6]), nodes_=nodes(d={"registered_s": 50.0}),
          evicted={card("d", i): Evidence.of(Cause.NODE_SILENT, node="d", silent_s=3.0) for i in (0, 1)}),
     [("Readmit", ("d/card0", "d/card1")), ("BeginDrain", R(("join", "d/card0", "node_joined")))]),
    ("a card evicted for its own fault stays out when its node returns", NOW,
     view(gen(ranks=SLOTS[:6]), nodes_=nodes(d={"registered_s": 50.0}),
          evicted={card("d", 0): Evidence.of(Cause.FATAL_XID, xids="79"),
                   card("d", 1): Evidence.of(Cause.NODE_SILENT, node="d", silent_s=3.0)}),
     [("Readmit", ("d/card1",)), ("BeginDrain", R(("join", "d/card1", "node_joined")))]),
    ("a node left out of the generation on purpose does not join it", NOW,
     view(gen(ranks=SLOTS[:6]), nodes_=nodes(d={"registered_s": 5.0}),
          evicted={card("d", i): Evidence.of(Cause.FATAL_XID, xids="79") for i in (0, 1)}), []),
]


@pytest.mark.parametrize("now_s, state, expected", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_decide(now_s, state, expected):
    assert summary(decide(now_s, state, SETTINGS)) == expected


def test_evidence_renders_only_at_the_edge():
    (action,) = [a for a in decide(NOW, view(gen(last_progress_s=NOW - 5.5), nodes_=nodes(SILENT_B)), SETTINGS) if isinstance(a, MarkNodeLost)]
    assert action.evidence["silent_s"] == pytest.approx(5.0)
    assert action.evidence.describe() == "node b lost: no heartbeat for 5.0 s"


def test_decide_is_pure():
    state = view(health={card("a"): hot()})
    assert decide(NOW, state, SETTINGS) == decide(NOW, state, SETTINGS)
    assert isinstance(decide(NOW, view(job_state=JobState.PENDING), SETTINGS)[0], StartJob)
