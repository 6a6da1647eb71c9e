"""The 5D engine: this rank's part of a `ParallelLayout` (pipeline stage, tensor, context and expert
parallel shards, FSDP over dp × cp) built with `hyrun.runtime.parallel.parallelize`.

Fault signals differ from the data-parallel engine's, because FSDP reduces gradients inside the
backward where no hook sees them whole: a rank's local numeric fault is a forward of its own that
turned finite inputs into non-finite outputs (before any collective spreads the NaN), and it reports
entering the step's collectives as soon as the step starts (its first forward already communicates),
so a rank that hangs before that is the one that never says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from hyrun.runtime.model.transformer import MoETransformer
from hyrun.runtime.parallel.dims import ParallelDims
from hyrun.runtime.parallel.parallelize import parallelize
from hyrun.runtime.parallel.grads import clip_grads_, global_grad_norm, grads_finite_everywhere
from hyrun.runtime.parallel.layout import ParallelLayout

from hyrun.runtime.trainer.step import StepWork


class PlannedEngine:
    def __init__(self, model: MoETransformer, layout: ParallelLayout, *, device: torch.device,
                 on_enter_reduce: Callable[[], None]) -> None:
        self.layout = layout
        self.dims = ParallelDims.from_degrees(layout)
        self.mesh = self.dims.build_mesh(device.type)
        self.parallel = parallelize(
            model, dims=self.dims, mesh=self.mesh, layers_per_stage=layout.layers_per_stage or None,
            micro_batches_per_replica=layout.micro_batches_per_replica, expert_placement=layout.expert_placement,
            device=device,
        )  # fmt: skip
        self.module = self.parallel.module
        self.layers = self.module.layer_indices()
        self.on_enter_reduce = on_enter_reduce
        # Expert-LR token counts: summed over the ranks of this pipeline stage (shares are ratios,
        # so ranks that saw the same tokens — tp — counting them twice changes nothing).
        stage = self.mesh["dp", "cp", "tp"]._flatten("dp_cp_tp") if self.dims.world_size > self.dims.pp else None
        self._stage_group = stage.get_group() if stage is not None else None
        self.reduce_counts = self._sum_over_stage if stage is not None else None
        self._observe = None
        self.module.register_forward_hook(self._observe_routing)

    def _sum_over_stage(self, counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=self._stage_group)
        return counts

    def _observe_routing(self, module, args, output) -> None:
        if self._observe is not None:
            self._observe(module.router_stats, self.layers)

    def begin_step(self, step: int, *, corrupt: bool) -> None:
        self.parallel.corrupt = corrupt
        self.module.set_routing_step(step)
        self.on_enter_reduce()

    def forward_backward(self, micro_batches: Sequence[torch.Tensor], *, speed: float, observe) -> StepWork:
        self._observe = observe
        self.parallel.clock.speed = speed
        try:
            result = self.parallel.forward_backward(micro_batches)
        finally:
            self._observe = None
        timing = result.timing
        # The global norm (FSDP reduced the local gradients inside the backward); clipping reuses it.
        self._norm = float(global_grad_norm(self.module, self.dims, pp_group=self.parallel.pp_group,
                                            ep_group=self.parallel.ep_group))
        return StepWork(ce=result.loss, compute_s=timing.compute_s, comm_wait_s=timing.comm_wait_s,
                        bubble_s=timing.bubble_s, grad_norm=self._norm, nonfinite=self.parallel.nonfinite_origins)

    def grads_finite(self) -> bool:
        return grads_finite_everywhere(self.module)

    def clip_grad_norm(self, max_norm: float) -> None:
        clip_grads_(self.module, max_norm, self._norm)
