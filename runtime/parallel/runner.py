"""One step's forward and backward for this rank's part of the plan: its replica's micro-batches,
through the 1F1B schedule when pipelined, gradients weighted by tokens.

Every replica scales its micro-batch losses by dp / (micro-batches of the whole step); FSDP's mean
over dp × cp then makes each gradient the mean over all the step's micro-batches: the update of one
card running the whole global batch, however unevenly the replicas split it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from .data_parallel import set_gradient_sync
from .dims import ParallelDims
from .expert_parallel import sync_expert_gradients
from .pipeline import build_schedule
from .stage import StageTransformer, shard_sequence
from .timing import CommTimer, StepClock, StepTiming


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean cross-entropy over this replica's micro-batches (same on its pp/cp/tp ranks)
    tokens: int  # tokens this replica trained on
    timing: StepTiming


class ParallelModel:
    """What `parallelize` returns. `module` is this rank's stage (give its parameters to the
    optimizer); `forward_backward(micro_batches)` leaves reduced gradients on them."""

    def __init__(self, module: StageTransformer, *, dims: ParallelDims, mesh: DeviceMesh, device: torch.device,
                 comm_timer: CommTimer, ep_group, edp_group, micro_batches_per_replica: tuple[int, ...] | None) -> None:
        self.module, self.dims, self.mesh, self.device = module, dims, mesh, device
        self.ep_group, self.edp_group = ep_group, edp_group  # None without expert parallelism
        self.micro_batches_per_replica = micro_batches_per_replica
        self.clock = StepClock(module, comm_timer, pipelined=dims.pp_enabled, cpu=torch.device(device).type == "cpu")
        self._schedules: dict[tuple, object] = {}
        self._ce: list[torch.Tensor] = []
        # Local numerics: forwards of this rank that turned finite inputs into non-finite outputs —
        # where a bad card shows itself before any collective spreads its NaNs to its peers.
        self.nonfinite_origins = 0
        self.corrupt = False  # fault injection: this rank's stage outputs become NaN
        module.register_forward_hook(self._check_numerics)
        self.pp_group = mesh["pp"].get_group() if dims.pp_enabled else None

    def _check_numerics(self, module, args, output) -> None:
        hidden = output[0]
        if self.corrupt:
            poison = torch.zeros_like(hidden)
            poison.view(-1)[0] = float("nan")
            hidden = hidden + poison
            output = (hidden, *output[1:])
        inputs = args[0]
        finite_in = not inputs.is_floating_point() or bool(torch.isfinite(inputs).all())
        if finite_in and not bool(torch.isfinite(hidden).all()):
            self.nonfinite_origins += 1
        return output

    @property
    def replica(self) -> int:
        return self.mesh["dp"].get_local_rank()

    def forward_backward(self, micro_batches: Sequence[torch.Tensor]) -> StepResult:
        """micro_batches: this replica's token tensors [batch, seq + 1] (inputs and shifted targets), or
        [batch, 2, seq + 1] with the segment ids of packed documents second; the same on every pp, cp
        and tp rank of the replica."""
        count = len(micro_batches)
        expected = self.micro_batches_per_replica
        if expected is not None and count != expected[self.replica]:
            raise ValueError(f"replica {self.replica} got {count} micro-batches, the plan gives it "
                             f"{expected[self.replica]}")
        total = sum(expected) if expected is not None else count * self.dims.dp
        scale = self.dims.dp / total
        self.clock.start()
        self._ce = []
        self.nonfinite_origins = 0
        cp_rank, cp = self.mesh["cp"].get_local_rank(), self.dims.cp
        # (inputs, targets) of each micro-batch, cut to this rank's chunks of the sequence.
        pairs = [tuple(shard_sequence(part, cp_rank, cp) for part in (t[..., :-1], _tokens(t)[:, 1:]))
                 for t in (t.to(self.device) for t in micro_batches)]
        if self.dims.pp_enabled:
            self._pipelined(pairs, scale)
        else:
            for i, (inputs, targets) in enumerate(pairs):
                set_gradient_sync(self.module, last_micro_batch=i == count - 1)
                logits, aux = self.module(inputs)
                with self.clock.backward():
                    (self._loss(logits, aux, targets) * scale).backward()
        sync_expert_gradients(self.module, self.edp_group)
        timing = self.clock.finish()
        return StepResult(loss=self._replica_loss(count), tokens=sum(_tokens(t)[:, 1:].numel() for t in micro_batches),
                          timing=timing)

    def _loss(self, logits: torch.Tensor, aux: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self._ce.append(ce.detach())
        config = self.module.config
        return ce + config.aux_loss_coeff * aux.sum() / config.num_layers

    def _pipelined(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        count = len(pairs)
        # Stages size their receive buffers from the first micro-batches a schedule sees: a new sequence
        # length (a long-context stage) needs a schedule of its own.
        key = (count, tuple(pairs[0][0].shape))
        if key not in self._schedules:
            loss_fn = lambda output, target: self._loss(output[0], output[1], target) * scale  # noqa: E731
            self._schedules[key] = build_schedule(self.module, pp_mesh=self.mesh["pp"], num_micro_batches=count,
                                                  loss_fn=loss_fn, device=self.device)
        schedule = self._schedules[key]
        if self.module.is_first:
            schedule.step(torch.cat([inputs for inputs, _ in pairs]))
        elif self.module.is_last:
            schedule.step(target=torch.cat([targets for _, targets in pairs]))
        else:
            schedule.step()

    def _replica_loss(self, count: int) -> float:
        """Mean CE of the replica's micro-batches, known on the last stage, shared with the others."""
        # The last count: on its first step the schedule also runs the loss once while it sets up.
        loss = torch.stack(self._ce[-count:]).sum() / count if self._ce else torch.zeros(())
        loss = loss.to(self.device)
        if self.dims.pp_enabled:
            dist.all_reduce(loss, group=self.pp_group)
        if self.dims.cp_enabled:
            dist.all_reduce(loss, group=self.mesh["cp"].get_group())
            loss = loss / self.dims.cp
        return float(loss)


def _tokens(micro_batch: torch.Tensor) -> torch.Tensor:
    """The token ids of a micro-batch with or without its segment ids stacked second."""
    return micro_batch[:, 0] if micro_batch.dim() == 3 else micro_batch
