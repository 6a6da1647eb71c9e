"""`parallelize`: turn a whole, identically initialised `MoETransformer` into this rank's part of a 5D
plan, applying the dimensions in a fixed order (TorchTitan's): pipeline split, tensor parallel,
context parallel, expert parallel, FSDP last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh

from hyrun.runtime.model.transformer import MoETransformer

from .context_parallel import apply_context_parallel
from .data_parallel import apply_fsdp
from .dims import ParallelDims
from .expert_parallel import apply_expert_parallel, contiguous_placement
from .pipeline import stage_layers
from .runner import ParallelModel
from .stage import as_stage
from .tensor_parallel import apply_tensor_parallel
from .timing import CommTimer


def parallelize(model: MoETransformer, *, dims: ParallelDims, mesh: DeviceMesh,
                layers_per_stage: Sequence[int] | None = None,
                micro_batches_per_replica: Sequence[int] | None = None,
                expert_placement: Sequence[Sequence[int]] | None = None,
                device: torch.device | str = "cpu") -> ParallelModel:
    """Collective: every rank calls it with the same arguments and its own copy of the model.

    `mesh` is `dims.build_mesh()`. `layers_per_stage` defaults to an even split; micro-batch counts
    to the same on every replica; `expert_placement[layer][expert]` (an ep rank) to contiguous blocks.
    """
    device = torch.device(device)
    config = model.config
    coord = {name: mesh[name].get_local_rank() for name in ("pp", "dp", "cp", "tp")}
    micro_batches = _check_micro_batches(dims, micro_batches_per_replica)
    comm = CommTimer()

    # 1. Pipeline: keep this rank's stage (layers, plus embedding first / head last), names unchanged.
    counts = layers_per_stage or _even_split(config.num_layers, dims.pp)
    if len(counts) != dims.pp:
        raise ValueError(f"layers_per_stage={tuple(counts)} has {len(counts)} entries for pp={dims.pp}")
    layers = stage_layers(counts, model.pipeline_split_points(), config.num_layers)[coord["pp"]]
    model = as_stage(model, layers, is_first=coord["pp"] == 0, is_last=coord["pp"] == dims.pp - 1,
                     cp_rank=coord["cp"], cp_size=dims.cp)

    # 2. Tensor parallel: heads and shared-expert units split over tp (DTensor parameters).
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"])

    # 3. Context parallel: attention over the whole sequence from this rank's two chunks.
    if dims.cp_enabled:
        apply_context_parallel(model, mesh["cp"].get_group(), comm)

    # 4. Expert parallel: routed experts split over ep (borrowed from dp × cp), all-to-all dispatch.
    ep_group = edp_group = None
    if dims.ep_enabled:
        expert_mesh = dims.build_expert_mesh(device.type)
        ep_group, edp_group = expert_mesh["ep"].get_group(), expert_mesh["edp"].get_group()
        for key, block in model.blocks.items():
            experts = block.moe.experts
            placement = (expert_placement[int(key)] if expert_placement is not None
                         else contiguous_placement(experts.num_experts, dims.ep))
            apply_expert_parallel(experts, placement=placement, ep_rank=expert_mesh["ep"].get_local_rank(),
                                  ep_group=ep_group,
                                  grad_divide_factor=dims.gradient_divide_factor, comm_timer=comm)

    # 5. FSDP last, over dp × cp: every dense gradient becomes the mean over those ranks.
    if dims.fsdp_enabled:
        apply_fsdp(model, mesh["dp_cp"])

    return ParallelModel(model, dims=dims, mesh=mesh, device=device, comm_timer=comm, ep_group=ep_group, edp_group=edp_group,
                         micro_batches_per_replica=micro_batches)


def _even_split(num_layers: int, pp: int) -> tuple[int, ...]:
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


def _check_micro_batches(dims: ParallelDims, counts: Sequence[int] | None) -> tuple[int, ...] | None:
    if counts is None:
        return None  # uniform: every replica runs as many as it is given
    counts = tuple(counts)
    if len(counts) != dims.dp or min(counts) < 1:
        raise ValueError(f"micro_batches_per_replica={counts} needs dp={dims.dp} entries >= 1")
    if dims.ep_enabled and dims.ep > dims.cp:
        # An expert group spans ep/cp replicas that meet in an all-to-all on every micro-batch.
        span = dims.ep // dims.cp
        for start in range(0, dims.dp, span):
            group = counts[start:start + span]
            if len(set(group)) > 1:
                raise ValueError(f"replicas {start}..{start + span - 1} share an expert group (ep={dims.ep}, "
                                 f"cp={dims.cp}) and must run equal micro-batch counts, got {group}")
    return counts
