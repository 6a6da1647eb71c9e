"""The parallel degrees and the rank arithmetic every part agrees on, in plain Python: the checks
(positive, multiplying to the world size, ep borrowing from dp × cp), "is EP on?" and a rank's
coordinates. The coordinator validates layouts with it without torch; `dims.ParallelDims` adds the meshes.

Rank order is tp fastest: rank = ((p·dp + d)·cp + c)·tp + t, the planner's order. Expert parallelism
borrows its ranks from dp × cp: the expert mesh splits that product into (`edp`, `ep`), so expert-group
member k of a dp/cp position is (d·cp + c) mod ep, as in the planner's `Degrees.ep_rank` and
TorchTitan's ParallelDims.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MESH_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_MESH_DIMS = ("pp", "edp", "ep", "tp")


@dataclass(frozen=True)
class ParallelDegrees:
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    world_size: int

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name}={value!r} must be a positive int")
        product = self.pp * self.dp * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(f"pp={self.pp} x dp={self.dp} x cp={self.cp} x tp={self.tp} = {product} "
                             f"ranks, but world_size={self.world_size}")
        shards = self.dp * self.cp
        if shards % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp*cp={self.dp}*{self.cp}={shards}: expert "
                             "parallelism borrows its ranks from the data- and context-parallel ranks")
        if self.ep % self.cp and self.cp % self.ep:
            raise ValueError(f"ep={self.ep} and cp={self.cp}: one must divide the other")

    @classmethod
    def from_degrees(cls, degrees, world_size: int | None = None) -> "ParallelDegrees":
        """From the planner's `Degrees` (or anything with pp/dp/cp/tp/ep attributes)."""
        world = degrees.pp * degrees.dp * degrees.cp * degrees.tp if world_size is None else world_size
        return cls(dp=degrees.dp, tp=degrees.tp, pp=degrees.pp, cp=degrees.cp, ep=degrees.ep,
                   world_size=world)

    # --- questions everyone else asks -------------------------------------------------------------

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Dense parameters are sharded (and their gradients averaged) over dp × cp."""
        return self.dp * self.cp > 1

    @property
    def edp(self) -> int:
        """Replicas of each expert shard: the part of dp × cp that expert parallelism does not use."""
        return self.dp * self.cp // self.ep

    @property
    def gradient_divide_factor(self) -> int:
        """Every gradient is the mean over the dp × cp ranks (experts included, whatever ep is)."""
        return self.dp * self.cp

    def coordinate(self, rank: int) -> dict[str, int]:
        rank, t = divmod(rank, self.tp)
        rank, c = divmod(rank, self.cp)
        p, d = divmod(rank, self.dp)
        return {"pp": p, "dp": d, "cp": c, "tp": t}

    def ep_rank(self, rank: int) -> int:
        coord = self.coordinate(rank)
        return (coord["dp"] * self.cp + coord["cp"]) % self.ep
