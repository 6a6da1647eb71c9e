"""Health policy: pure functions from what the coordinator observed to verdicts with evidence.
Time is passed in and nothing here touches a process, so every rule is tested with hand-built state.
Mechanism (stopping workers, starting the next generation) lives in the orchestrator.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# What a rank prints when a *peer* died under it: these ranks are victims, not culprits.
_PEER_FAILURE = re.compile(
    r"connection (closed|reset)|broken pipe|connectFullMesh|timed out|timeout|"
    r"ProcessGroupGloo|DistBackendError|NCCL (error|communicator)|Socket Timeout|peer",
    re.IGNORECASE,
)


class VerdictKind(enum.Enum):
    EVICT = "evict"   # the card is bad now: end the generation, continue without it
    DRAIN = "drain"   # the card will be bad soon: checkpoint first, then continue without it


@dataclass(frozen=True)
class CardRef:
    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}/card{self.index}"


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    card: CardRef
    reason: str  # the evidence, in words a user can check against the logs


@dataclass(frozen=True)
class RankFailure:
    """A worker that exited non-zero during a generation."""

    rank: int
    card: CardRef
    exit_code: int   # < 0: killed by signal -exit_code
    reason: str
    at_s: float

    @property
    def looks_like_victim(self) -> bool:
        """Exited with an error about its peers (a collective failed because someone else died)."""
        return self.exit_code > 0 and bool(_PEER_FAILURE.search(self.reason))


def blame_exits(failures: list[RankFailure]) -> list[Verdict]:
    """Which cards to evict when ranks exit: when one rank dies, its peers' collectives fail and
    they exit too, so evict only the ranks that did not die of a peer's failure; if every one
    looks like a victim (the real cause printed nothing recognisable), evict the first to go."""
    if not failures:
        return []
    culprits = [f for f in failures if not f.looks_like_victim] or [min(failures, key=lambda f: f.at_s)]
    return [Verdict(VerdictKind.EVICT, f.card, f"rank {f.rank} {f.reason}") for f in culprits]


def lost_node_verdicts(node: str, card_indices: list[int], silent_s: float) -> list[Verdict]:
    reason = f"node {node} lost: no heartbeat for {silent_s:.1f} s"
    return [Verdict(VerdictKind.EVICT, CardRef(node, index), reason) for index in card_indices]


def hung_ranks(
    steps_done: dict[int, int], reduce_entered: dict[int, int], world_size: int, silent_s: float
) -> list[int] | None:
    """Which ranks a hung step waits for: those furthest behind, by (last step completed, whether
    they entered the all-reduce of the next one). None when every rank is equally far (nobody to
    single out: the whole generation is stuck)."""
    def progress(rank: int) -> tuple[int, int]:
        done = steps_done.get(rank, 0)
        return done, int(reduce_entered.get(rank, 0) > done)

    keys = {rank: progress(rank) for rank in range(world_size)}
    slowest = min(keys.values())
    if all(key == slowest for key in keys.values()):
        return None
    return sorted(rank for rank, key in keys.items() if key == slowest)


def describe_hang(rank: int, steps_done: int, silent_s: float) -> str:
    return (
        f"rank {rank} hung: no progress for {silent_s:.1f} s; it completed step {steps_done} and never "
        f"entered the all-reduce of step {steps_done + 1}, which its peers wait in"
    )
