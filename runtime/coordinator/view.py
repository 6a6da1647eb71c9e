"""The frozen snapshot decide() reads: membership, card health, the job and its generation, and
the coordinator's own loop health. Built by the orchestrator on each policy tick; tests build it
by hand. Nothing here refers back to mutable state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hyrun.runtime.coordinator.actions import CardRef, Evidence, Verdict
from hyrun.runtime.coordinator.generation import RankSlot
from hyrun.runtime.coordinator.lifecycle import GenState, JobState
from hyrun.runtime.coordinator.policy import RankFailure
from hyrun.runtime.jobfile import HealthSection

@dataclass(frozen=True)
class NodeView:
    name: str
    alive: bool
    connected: bool
    last_heartbeat_s: float
    registered_s: float
    cards: tuple[int, ...]  # card indices


@dataclass(frozen=True)
class CardHealthView:
    temperatures: tuple[tuple[float, float], ...] = ()  # (time_s, °C), oldest first
    slowdown_c: float = 0.0
    ecc_new: int = 0
    xids: tuple[int, ...] = ()


@dataclass(frozen=True)
class NicSampleView:
    """One heartbeat's reading of a node's data NIC (cumulative counters)."""

    time_s: float
    interface: str
    carrier: bool
    tx_bytes: int
    queue_overlimits: int
    queue_backlog_bytes: int
    rdma_tx_bytes: int = 0  # RDMA traffic bypasses the kernel's interface counters
    rdma_xmit_wait: int = 0  # ticks an RDMA port waited for credit: the fabric's congestion signal


@dataclass(frozen=True)
class GenerationView:
    number: int
    state: GenState
    ranks: tuple[RankSlot, ...]
    started_s: float = 0.0
    steps_by_rank: Mapping[int, int] = field(default_factory=dict)
    reduce_entered: Mapping[int, int] = field(default_factory=dict)
    last_progress_s: float = 0.0
    committed_step: int = 0
    exited_ok: frozenset[int] = frozenset()
    failures: tuple[RankFailure, ...] = ()
    failing_since: float | None = None
    drain_verdicts: tuple[Verdict, ...] = ()
    drain_after_step: int = 0
    drain_deadline_s: float = 0.0
    nonfinite_by_step: Mapping[int, Mapping[int, bool]] = field(default_factory=dict)  # step -> rank -> non-finite local grads
    seconds_per_micro_batch: Mapping[CardRef, tuple[float, ...]] = field(default_factory=dict)  # recent window per card

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(slot.node for slot in self.ranks)

    @property
    def cards(self) -> dict[CardRef, RankSlot]:
        return {slot.card: slot for slot in self.ranks}


@dataclass(frozen=True)
class JobView:
    state: JobState
    node_names: tuple[str, ...]  # the job's nodes, in job-file order
    submitted_s: float = 0.0
    step: int = 0
    total_steps: int = 0  # the job's last step: ranks past it are finishing, not hung
    fault_tolerance: bool = True
    checkpoints: bool = True
    evicted: Mapping[CardRef, Evidence] = field(default_factory=dict)
    measured_speed: Mapping[CardRef, float] = field(default_factory=dict)
    measured_link_mbit: Mapping[str, float] = field(default_factory=dict)  # congested links the plan expects
    drain_requests: Mapping[CardRef, Evidence] = field(default_factory=dict)  # operator drains not yet carried out
    readmit_requests: Mapping[CardRef, Evidence] = field(default_factory=dict)  # repaired cards not yet taken back
    # error signature (digits masked) -> cards evicted for raising it in earlier generations
    blamed_errors: Mapping[str, tuple[CardRef, ...]] = field(default_factory=dict)
    generation: GenerationView | None = None


@dataclass(frozen=True)
class View:
    job: JobView | None
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    health: Mapping[CardRef, CardHealthView] = field(default_factory=dict)
    # The end of the coordinator's own last stall: silence before it is the coordinator's, not the agents'.
    stalled_until_s: float = float("-inf")
    hold_since_s: float | None = None  # evictions held since (mass silence)
    data_nics: Mapping[str, tuple[NicSampleView, ...]] = field(default_factory=dict)  # node -> recent samples


@dataclass(frozen=True)
class DecideSettings:
    heartbeat_timeout_s: float = 5.0
    # A node in a starting generation (workers importing torch, building the model) or just
    # registered gets this longer lease: start-up is when a host is busiest (Kubernetes'
    # nodeStartupGracePeriod).
    node_startup_grace_s: float = 15.0
    node_wait_timeout_s: float = 60.0
    failure_grace_s: float = 0.5
    job_error_wait_s: float = 5.0  # ranks failing the same way: wait this long for the rest
    drain_timeout_s: float = 120.0
    hang_timeout_s: float = 60.0
    # More than this share of the job's nodes (and at least `mass_silence_min_nodes`) silent at once:
    # suspect the coordinator or the network and hold evictions for up to `mass_silence_hold_s`.
    mass_silence_share: float = 0.5
    mass_silence_min_nodes: int = 2
    mass_silence_hold_s: float = 30.0
    health: HealthSection = field(default_factory=HealthSection)
