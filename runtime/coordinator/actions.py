"""What the coordinator's decision function returns: typed actions, each with structured evidence
(a cause and the numbers that triggered it). Text is made from evidence only at the edge (logs,
status, incidents) through one table of templates, so rules and their tests compare causes and
numbers, never strings."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class CardRef:
    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}/card{self.index}"


class Cause(enum.Enum):
    WORKER_EXIT = "worker_exit"
    NODE_SILENT = "node_silent"
    NODE_DISCONNECTED = "node_disconnected"
    HANG = "hang"
    STUCK = "stuck"
    FATAL_XID = "fatal_xid"
    ECC = "ecc"
    TEMPERATURE_NEAR = "temperature_near"
    TEMPERATURE_TREND = "temperature_trend"
    CORRUPTION = "corruption"
    STRAGGLER = "straggler"
    OPERATOR_DRAIN = "operator_drain"
    OPERATOR_READMIT = "operator_readmit"
    NODE_JOINED = "node_joined"
    JOB_ERROR = "job_error"
    DRAIN_TIMEOUT = "drain_timeout"
    NODES_MISSING = "nodes_missing"
    MASS_SILENCE = "mass_silence"
    SILENT_WITH_PROGRESS = "silent_with_progress"
    LINK_DOWN = "link_down"
    LINK_CONGESTED = "link_congested"
    LINK_BACK = "link_back"
    FINISHED = "finished"


# Every sentence the coordinator says about a decision, in one place.
_TEMPLATES: dict[Cause, str] = {
    Cause.WORKER_EXIT: "rank {rank} on node {node} card {card} ({card_type}) {reason}",
    Cause.NODE_SILENT: "node {node} lost: no heartbeat for {silent_s:.1f} s",
    Cause.NODE_DISCONNECTED: "node {node} lost: its agent's stream closed",
    Cause.HANG: "rank {rank} hung: no progress for {silent_s:.1f} s; it completed step {step} and never "
    "entered the all-reduce of step {next_step}, which its peers wait in",
    Cause.STUCK: "generation {generation} stuck for {silent_s:.1f} s with every rank at the same point; restarting it",
    Cause.FATAL_XID: "fatal XID {xids}",
    Cause.ECC: "{count} new uncorrectable ECC error(s)",
    Cause.TEMPERATURE_NEAR: "temperature {temperature_c:.1f} °C is within {margin_c:.0f} °C of its slowdown "
    "threshold {slowdown_c:.0f} °C",
    Cause.TEMPERATURE_TREND: "temperature {temperature_c:.1f} °C rising {rise_c_per_min:.1f} °C/min: reaches its "
    "slowdown threshold {slowdown_c:.0f} °C (less the {margin_c:.0f} °C margin) in about {crossing_s:.0f} s",
    Cause.CORRUPTION: "rank {rank} had non-finite local gradients at steps {steps} while its data-parallel peers "
    "were finite: suspected silent data corruption",
    Cause.STRAGGLER: "straggler: {ratio:.1f}× slower than its {card_type} peers for {window} steps "
    "({ms_per_micro_batch:.0f} ms per micro-batch){action}",
    Cause.OPERATOR_DRAIN: "drained by request{colon}{reason}",
    Cause.OPERATOR_READMIT: "readmitted by request{colon}{reason}: joins at the next checkpoint",
    Cause.NODE_JOINED: "node {node} joined with {cards} usable cards",
    Cause.JOB_ERROR: "the job, not a card, is at fault ({why}; no card is quarantined): {reason}",
    Cause.DRAIN_TIMEOUT: "the drain's checkpoint did not commit within {timeout_s:.0f} s; leaving without it",
    Cause.NODES_MISSING: "nodes {nodes} did not register within {waited_s:.0f} s",
    Cause.MASS_SILENCE: "{silent} of {nodes} nodes silent at once: suspecting the coordinator or the network, "
    "holding evictions for up to {hold_s:.0f} s",
    Cause.SILENT_WITH_PROGRESS: "node {node} silent for {silent_s:.1f} s, but its peers completed step {peer_step} "
    "with it (its ranks last reported step {own_step}): not dead",
    Cause.LINK_DOWN: "node {node}'s data link {interface} is down (no carrier) while its agent still reports: "
    "its peers cannot reach it",
    Cause.LINK_CONGESTED: "node {node}'s data link {interface} is congested: its egress queue held packets back on "
    "{strikes} of the last {window} heartbeats, moving {mbit:.1f} Mbit/s (trend {trend_mbit_per_s:+.1f} Mbit/s per s) "
    "where its peers reached {peers_mbit:.1f} Mbit/s",
    Cause.LINK_BACK: "node {node}'s data link {interface} is up again: its cards rejoin at the next checkpoint",
    Cause.FINISHED: "trained {steps} steps in {elapsed_s:.1f} s",
}


@dataclass(frozen=True)
class Evidence:
    """Why: a cause and the facts behind it (numbers, names), kept as data until shown."""

    cause: Cause
    facts: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, cause: Cause, **facts: Any) -> Evidence:
        return cls(cause, tuple(sorted(facts.items())))

    def __getitem__(self, name: str) -> Any:
        return dict(self.facts)[name]

    def describe(self) -> str:
        return _TEMPLATES[self.cause].format(**dict(self.facts))


class VerdictKind(enum.Enum):
    EVICT = "evict"    # the card is bad now: end the generation, continue without it
    DRAIN = "drain"    # the card will be bad soon: checkpoint first, then continue without it
    REPLAN = "replan"  # the card is slower than believed: checkpoint, then plan with its measured speed
    JOIN = "join"      # a node (back) in the job: checkpoint, then plan with its cards


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    card: CardRef
    evidence: Evidence
    speed: float | None = None  # REPLAN: the card's measured speed, for the planner

    @property
    def reason(self) -> str:
        return self.evidence.describe()

    @property
    def leaves_after_checkpoint(self) -> bool:
        return self.kind is not VerdictKind.EVICT


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartJob:
    """Every node of the job has registered: plan and start the first generation."""


@dataclass(frozen=True)
class MarkNodeLost:
    """Stop planning on a node (its lease ran out or its stream closed) until it registers again."""

    node: str
    evidence: Evidence


@dataclass(frozen=True)
class Recover:
    """End the generation now, apply the verdicts (evict, replan, join) and start the next one.
    `committed_step`: a drain's checkpoint committed at this step, so nothing up to it is lost."""

    verdicts: tuple[Verdict, ...]
    evidence: tuple[Evidence, ...]
    committed_step: int | None = None


@dataclass(frozen=True)
class BeginDrain:
    """Ask every rank for a checkpoint now; the verdicts are carried out once it commits."""

    verdicts: tuple[Verdict, ...]


@dataclass(frozen=True)
class Quarantine:
    """Keep cards out of the job without touching the running generation (they are not in it)."""

    cards: tuple[CardRef, ...]
    evidence: Evidence


@dataclass(frozen=True)
class Readmit:
    """Cards evicted without a fault of their own come back: lost with a node that registered again,
    or blamed for an error that turned out to be the job's."""

    cards: tuple[CardRef, ...]
    evidence: Evidence


@dataclass(frozen=True)
class HoldEvictions:
    """Most nodes went silent at once: suspect the coordinator or the network, evict nobody for a while."""

    evidence: Evidence
    since_s: float


@dataclass(frozen=True)
class Note:
    """Something decide() chose not to act on, worth a log line (a quiet node whose peers progress)."""

    evidence: Evidence


@dataclass(frozen=True)
class ReleaseHold:
    """The silence that started a hold is over."""


@dataclass(frozen=True)
class FailJob:
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class FinishJob:
    evidence: Evidence


Action = Union[StartJob, MarkNodeLost, Recover, BeginDrain, Quarantine, Readmit, HoldEvictions, Note, ReleaseHold, FailJob, FinishJob]


def describe_all(evidence: tuple[Evidence, ...] | list[Evidence]) -> str:
    return "; ".join(e.describe() for e in evidence)
