"""`ParallelLayout`: the part of a plan every rank of a generation must agree on — the five degrees,
each pipeline stage's layer count, each data-parallel replica's micro-batch count and where every
routed expert lives. The coordinator makes it (from the planner's plan, explicit degrees or an even
split) and sends it to each worker as JSON, which builds its mesh and `parallelize`s from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

from hyrun.runtime.parallel.degrees import ParallelDegrees


@dataclass(frozen=True)
class ParallelLayout:
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    layers_per_stage: tuple[int, ...] = ()  # () = an even split (only for pp = 1 it is always legal)
    micro_batches_per_replica: tuple[int, ...] = ()  # one count per dp replica
    expert_placement: tuple[tuple[int, ...], ...] | None = None  # [layer][expert] → ep rank; None: even blocks

    def __post_init__(self) -> None:
        self.dims  # degrees are checked by ParallelDegrees
        if len(self.micro_batches_per_replica) != self.dp or min(self.micro_batches_per_replica) < 1:
            raise ValueError(f"micro_batches_per_replica={self.micro_batches_per_replica} needs dp={self.dp} "
                             "entries >= 1")
        if self.layers_per_stage and len(self.layers_per_stage) != self.pp:
            raise ValueError(f"layers_per_stage={self.layers_per_stage} needs pp={self.pp} entries")

    @classmethod
    def data_parallel(cls, micro_batches_per_replica: Sequence[int]) -> "ParallelLayout":
        counts = tuple(micro_batches_per_replica)
        return cls(dp=len(counts), micro_batches_per_replica=counts)

    @classmethod
    def from_plan(cls, plan) -> "ParallelLayout":
        """From the planner's `Plan`."""
        d = plan.degrees
        placement = tuple(tuple(int(owner) for owner in layer) for layer in plan.expert_placement)
        return cls(dp=d.dp, tp=d.tp, pp=d.pp, cp=d.cp, ep=d.ep, layers_per_stage=tuple(plan.layers_per_stage),
                   micro_batches_per_replica=tuple(plan.micro_batches_per_replica),
                   expert_placement=placement if d.ep > 1 and placement else None)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @cached_property  # asked for every rank and every step report; the layout never changes
    def dims(self) -> ParallelDegrees:
        return ParallelDegrees(dp=self.dp, tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, world_size=self.world_size)

    @property
    def data_parallel_only(self) -> bool:
        return self.world_size == self.dp and self.ep == 1

    def replica(self, rank: int) -> int:
        return self.dims.coordinate(rank)["dp"]

    def micro_batches(self, rank: int) -> int:
        """Micro-batches rank `rank` trains per step: its replica's (the same on its pp/cp/tp ranks)."""
        return self.micro_batches_per_replica[self.replica(rank)]

    def micro_batch_offset(self, rank: int) -> int:
        """Index of the rank's replica's first micro-batch in the step's global batch."""
        return sum(self.micro_batches_per_replica[: self.replica(rank)])

    def stage_share(self, rank: int) -> float:
        """The fraction of the model's layers the rank's pipeline stage holds (1.0 without a pipeline;
        1/pp for an even split given as no counts)."""
        if self.pp == 1:
            return 1.0
        if not self.layers_per_stage:
            return 1.0 / self.pp
        return self.layers_per_stage[self.dims.coordinate(rank)["pp"]] / sum(self.layers_per_stage)

    def describe(self) -> str:
        degrees = " × ".join(f"{name}={getattr(self, name)}" for name in ("pp", "dp", "cp", "tp") if getattr(self, name) > 1)
        extra = [f"ep={self.ep}"] if self.ep > 1 else []
        if self.pp > 1 and self.layers_per_stage:
            extra.append(f"layers {'/'.join(map(str, self.layers_per_stage))}")
        if len(set(self.micro_batches_per_replica)) > 1:
            extra.append(f"micro-batches {'/'.join(map(str, self.micro_batches_per_replica))}")
        return ", ".join([degrees or "dp=1", *extra])

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ParallelLayout":
        raw = json.loads(text)
        placement = raw.pop("expert_placement", None)
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()},
                   expert_placement=tuple(tuple(layer) for layer in placement) if placement is not None else None)
