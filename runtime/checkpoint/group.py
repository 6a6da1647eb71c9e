"""The checkpointer's own collectives, on gloo groups created for it alone.

Training collectives (DDP/FSDP on NCCL or gloo) run on the main thread; the commit protocol runs on
the writer thread and the due-vote on the main thread. Each gets its own group: two threads issuing
collectives on one group could interleave them in a different order on different ranks and deadlock.
With one rank (or no torch.distributed) every call is local.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class RankGroup:
    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.process_group = group

    @classmethod
    def create(cls, rank: int, world_size: int, timeout_s: float) -> "RankGroup":
        """Collective when world_size > 1: every rank must call it, in the same order."""
        if world_size == 1:
            return cls(rank, 1, None)
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(rank, world_size, group)

    @property
    def distributed(self) -> bool:
        return self.process_group is not None

    def all_gather_object(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.process_group)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(self.process_group, 0), group=self.process_group
        )
        return box[0]

    def start_max(self, values: list[int]) -> "PendingMax":
        """Element-wise max over ranks, started now and read later, so the wait overlaps a step."""
        tensor = torch.tensor(values, dtype=torch.int64)
        if not self.distributed:
            return PendingMax(tensor, None)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True)
        return PendingMax(tensor, work)

    def destroy(self) -> None:
        if self.process_group is not None and dist.is_initialized():
            dist.destroy_process_group(self.process_group)
        self.process_group = None


class PendingMax:
    def __init__(self, tensor: torch.Tensor, work: Any) -> None:
        self._tensor = tensor
        self._work = work

    def result(self) -> list[int]:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._tensor.tolist()
