"""The planner's answer: which card does what, and what the cost model predicts for it.

Ranks follow the mesh order (pp, dp, cp, tp) with tp fastest, the order TorchTitan's ParallelDims
builds its device mesh in: rank = ((p * dp + d) * cp + c) * tp + t. `rank_to_card[rank]` is the card
(global id) that rank must run on; a data-parallel-only runtime reads `rank_to_card` and
`micro_batches_per_replica` and nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Any

from .cards import GIB


@dataclass(frozen=True)
class Degrees:
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"degree {field.name}={value!r} must be a positive int")
        shards = self.dp * self.cp
        if shards % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp*cp={shards}: expert parallelism borrows its "
                             "ranks from the data- and context-parallel ranks")
        if self.ep % self.cp and self.cp % self.ep:
            raise ValueError(f"ep={self.ep} and cp={self.cp}: one must divide the other, so an expert "
                             "group is either inside one context-parallel ring or spans whole rings")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def replicas_per_expert_group(self) -> int:
        """Data-parallel replicas an expert group spans; they run micro-batches in lockstep."""
        return max(1, self.ep // self.cp)

    def rank(self, pp: int, dp: int, cp: int, tp: int) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def coordinate(self, rank: int) -> tuple[int, int, int, int]:
        rank, t = divmod(rank, self.tp)
        rank, c = divmod(rank, self.cp)
        p, d = divmod(rank, self.dp)
        return p, d, c, t

    def ep_rank(self, dp: int, cp: int) -> int:
        """Position in its expert group of the rank at data-parallel index dp, context index cp."""
        return (dp * self.cp + cp) % self.ep

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


@dataclass(frozen=True)
class StepTimeTerms:
    """The predicted step time, split so the parts add up to it. Busy terms are averaged over ranks
    (what a typical rank spends on each), idle terms are what a typical rank waits for."""

    compute_s: float
    tp_comm_s: float
    cp_comm_s: float  # ring exchange not hidden behind the attention it feeds
    expert_all_to_all_s: float
    pipeline_p2p_s: float
    pipeline_bubble_s: float  # 1F1B fill and drain
    dp_grad_sync_s: float  # reduce-scatter + all-gather not hidden behind backward / forward
    straggler_wait_s: float  # fast ranks (or stages) waiting for slow ones

    @property
    def total_s(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class CardMemory:
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    capacity_bytes: int

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def as_dict(self) -> dict[str, float]:
        out = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        out["total_bytes"] = float(self.total_bytes)
        return out


@dataclass(frozen=True)
class Plan:
    degrees: Degrees
    rank_to_card: tuple[int, ...]  # rank → card global id
    layers_per_stage: tuple[int, ...]
    micro_batches_per_replica: tuple[int, ...]  # micro-batches each data-parallel replica runs per step
    micro_batch_size: int  # sequences per micro-batch
    expert_placement: tuple[tuple[int, ...], ...]  # [layer][expert] → ep rank holding it
    step_time_s: float
    terms: StepTimeTerms
    memory_per_rank: tuple[CardMemory, ...]
    compute_time_per_rank_s: tuple[float, ...]  # busy forward+backward compute per step (calibration)
    unused_cards: tuple[int, ...] = ()
    label: str = "searched"

    def __post_init__(self) -> None:
        d = self.degrees
        if len(self.rank_to_card) != d.world_size:
            raise ValueError(f"rank_to_card has {len(self.rank_to_card)} entries for world size {d.world_size}")
        if len(self.layers_per_stage) != d.pp or min(self.layers_per_stage) < 1:
            raise ValueError(f"layers_per_stage={self.layers_per_stage} needs pp={d.pp} entries >= 1")
        if len(self.micro_batches_per_replica) != d.dp or min(self.micro_batches_per_replica) < 1:
            raise ValueError(f"micro_batches_per_replica={self.micro_batches_per_replica} needs dp={d.dp} "
                             "entries >= 1")

    # --- views the runtime reads -------------------------------------------------------------------

    @property
    def card_by_coordinate(self) -> dict[tuple[int, int, int, int], int]:
        """(pp, dp, cp, tp) → card global id."""
        return {self.degrees.coordinate(rank): card for rank, card in enumerate(self.rank_to_card)}

    @property
    def memory_by_card(self) -> dict[int, CardMemory]:
        return dict(zip(self.rank_to_card, self.memory_per_rank))

    @property
    def compute_time_by_card_s(self) -> dict[int, float]:
        return dict(zip(self.rank_to_card, self.compute_time_per_rank_s))

    @functools.cached_property
    def stage_layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """(first, last + 1) layer of each pipeline stage."""
        ranges, start = [], 0
        for count in self.layers_per_stage:
            ranges.append((start, start + count))
            start += count
        return tuple(ranges)

    @property
    def tokens_share_per_replica(self) -> tuple[float, ...]:
        """Each replica's share of the step's tokens: the weight its gradient gets so the update
        equals the one a uniform split would compute."""
        total = sum(self.micro_batches_per_replica)
        return tuple(m / total for m in self.micro_batches_per_replica)

    def rank_of_card(self, card: int) -> int:
        try:
            return self.rank_to_card.index(card)
        except ValueError:
            raise ValueError(f"card {card} has no rank in this plan (unused: {list(self.unused_cards)})") from None

    def experts_of_ep_rank(self, layer: int, ep_rank: int) -> tuple[int, ...]:
        return tuple(e for e, owner in enumerate(self.expert_placement[layer]) if owner == ep_rank)

    @functools.cached_property
    def _experts_per_ep_rank(self) -> tuple[tuple[int, ...], ...]:
        """[layer][ep rank] → how many experts it holds (computed once: to_dict asks for every rank)."""
        return tuple(tuple(owners.count(r) for r in range(self.degrees.ep)) for owners in self.expert_placement)

    def role_of_rank(self, rank: int) -> dict[str, Any]:
        p, d, c, t = self.degrees.coordinate(rank)
        first, end = self.stage_layer_ranges[p]
        ep_rank = self.degrees.ep_rank(d, c)
        experts = [self._experts_per_ep_rank[layer][ep_rank] for layer in range(first, end)]
        return {"rank": rank, "card": self.rank_to_card[rank], "pp": p, "dp": d, "cp": c, "tp": t,
                "ep_rank": ep_rank, "layers": [first, end], "micro_batches": self.micro_batches_per_replica[d],
                "experts_per_layer": experts}

    @property
    def peak_memory_gib(self) -> float:
        return max(m.total_bytes for m in self.memory_per_rank) / GIB

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: plain ints, floats, lists and string keys."""
        return {
            "label": self.label,
            "degrees": asdict(self.degrees),
            "rank_to_card": list(self.rank_to_card),
            "layers_per_stage": list(self.layers_per_stage),
            "micro_batches_per_replica": list(self.micro_batches_per_replica),
            "micro_batch_size": self.micro_batch_size,
            "expert_placement": [list(layer) for layer in self.expert_placement],
            "step_time_s": float(self.step_time_s),
            "terms": self.terms.as_dict(),
            "ranks": [dict(self.role_of_rank(rank), memory=self.memory_per_rank[rank].as_dict(),
                           compute_time_s=float(self.compute_time_per_rank_s[rank]))
                      for rank in range(self.degrees.world_size)],
            "unused_cards": list(self.unused_cards),
        }
