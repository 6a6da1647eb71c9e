"""What this rank holds of a tensor that may be a DTensor (FSDP and TP shard parameters, gradients
and optimizer state): its local part, and which dim-0 rows of the whole tensor that part covers.
One place for the model's optimizer, the parallel layer and checkpoints."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes this rank holds: a DTensor's local shard (a view: writing it writes the DTensor),
    a plain tensor itself."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def local_rows(tensor: torch.Tensor) -> range:
    """The dim-0 rows of the whole tensor that this rank's part holds (all of them for a plain tensor)."""
    if not isinstance(tensor, DTensor):
        return range(tensor.shape[0])
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return range(offset[0], offset[0] + shape[0])
