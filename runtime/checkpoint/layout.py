"""Flat layout of a state dict in one host buffer: where each tensor's bytes go, and a fingerprint
that says whether a snapshot taken by one process fits the model another process has built."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from hyrun.runtime.tensors import local_part

KeyPath = tuple[Any, ...]  # dict keys and list indices from the root of the state dict
_ALIGN_BYTES = 64  # every slot starts on a cache line, which also satisfies any dtype's alignment


@dataclass(frozen=True)
class TensorSlot:
    path: KeyPath
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset_bytes: int

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class StateLayout:
    slots: tuple[TensorSlot, ...]
    data_nbytes: int
    fingerprint: str  # over (path, dtype, local shape) of every tensor, in order


def flatten_state(
    state: Any, path: KeyPath = ()
) -> tuple[list[tuple[KeyPath, torch.Tensor]], dict[KeyPath, Any]]:
    """Tensor leaves (DTensors stay DTensors) in a fixed order, and every other leaf by path."""
    tensors: list[tuple[KeyPath, torch.Tensor]] = []
    others: dict[KeyPath, Any] = {}
    if isinstance(state, torch.Tensor):
        tensors.append((path, state))
    elif isinstance(state, dict):
        for key, value in state.items():
            sub_tensors, sub_others = flatten_state(value, path + (key,))
            tensors += sub_tensors
            others.update(sub_others)
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            sub_tensors, sub_others = flatten_state(value, path + (index,))
            tensors += sub_tensors
            others.update(sub_others)
    else:
        others[path] = copy.deepcopy(state)
    return tensors, others


def fingerprint_of(tensors: list[tuple[KeyPath, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for path, tensor in tensors:
        local = local_part(tensor)
        digest.update(repr((path, str(local.dtype), tuple(local.shape))).encode())
    return digest.hexdigest()


def plan_layout(tensors: list[tuple[KeyPath, torch.Tensor]]) -> StateLayout:
    slots = []
    offset_bytes = 0
    for path, tensor in tensors:
        local = local_part(tensor)
        slot = TensorSlot(path, local.dtype, tuple(local.shape), offset_bytes)
        slots.append(slot)
        offset_bytes += -(-slot.nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
    return StateLayout(tuple(slots), offset_bytes, fingerprint_of(tensors))


def rebuild_state(template: Any, leaf_for: Callable[[KeyPath, Any], Any], path: KeyPath = ()) -> Any:
    """A state dict of the template's structure whose leaves are leaf_for(path, template_leaf)."""
    if isinstance(template, torch.Tensor):
        return leaf_for(path, template)
    if isinstance(template, dict):
        return {key: rebuild_state(value, leaf_for, path + (key,)) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        items = [rebuild_state(value, leaf_for, path + (i,)) for i, value in enumerate(template)]
        return type(template)(items) if isinstance(template, tuple) else items
    return leaf_for(path, template)


def as_template_kind(staged: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Wraps a staged host tensor like the live one it copies: a DTensor keeps its mesh and
    placements, so DCP records the global shape and can reshard on load."""
    if isinstance(template, DTensor):
        # Not DTensor.from_local: it would move the host copy back onto the mesh's device.
        return DTensor(staged, template._spec, requires_grad=False)
    return staged
