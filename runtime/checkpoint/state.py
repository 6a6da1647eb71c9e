"""What a checkpoint holds of a model and its optimizer, in a form any parallel layout can load.

- The optimizer state is flattened by parameter name (`state.blocks.3.attention.wq.weight.exp_avg`),
  not by position: pipeline stages hold different parameters, and positions would collide.
- DTensors (FSDP, TP) are resharded by DCP itself.
- Stacked routed-expert parameters (and their optimizer state) are saved one expert per key
  (`blocks.0.moe.experts.w_down#expert5`, a view of that row of the rank's local tensor), whatever
  holds them: the whole stack (data parallel), an FSDP shard of its rows, or the experts placed on
  this rank (expert parallelism, a plain tensor of `local_experts`). Experts are then found by
  global id whatever layout saved or loads them, and replicas write once (DCP keeps one copy of
  identical keys).

`saved` is what is written and read (its tensors are the live ones or views of them, so loading
into it loads the model); `whole` is what `set_state_dict` takes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from hyrun.runtime.model.experts import GroupedExperts
from hyrun.runtime.tensors import local_part, local_rows

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_OPTIM_STATE_PREFIX = "state."


@dataclass
class LiveState:
    saved: dict[str, Any]  # {"model": ..., "optim": ...} with per-expert keys
    whole: dict[str, Any]  # {"model": ..., "optim": ...} as set_state_dict wants it

    def restored(self) -> dict[str, Any]:
        """`whole` with the non-tensor values a load put into `saved` (tensors were loaded in place)."""
        out = {}
        for part, whole in self.whole.items():
            saved = self.saved[part]
            out[part] = {key: saved.get(key, value) for key, value in whole.items()}
        return out


def expert_rows_by_name(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name → the global expert id of each dim-0 row of the parameter as the module holds
    it (before any FSDP sharding of those rows), for every stacked routed-expert parameter."""
    rows = {}
    for name, module in model.named_modules():
        if not isinstance(module, GroupedExperts):
            continue
        local = getattr(module, "local_experts", None)  # expert parallelism: some experts only
        held = tuple(local) if local is not None else tuple(range(module.num_experts))
        for param_name, _ in module.named_parameters(recurse=False):
            rows[f"{name}.{param_name}" if name else param_name] = held
    return rows


def _split(state: dict[str, Any], rows_by_name: dict[str, tuple[int, ...]], *, optimizer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = _param_name(key, rows_by_name, optimizer=optimizer)
        rows = rows_by_name.get(name) if name is not None else None
        if rows is not None and isinstance(value, torch.Tensor) and value.dim() > 0:
            local, rows = _local_rows(value, rows)
            if local.shape[0] == len(rows):
                for index, expert in enumerate(rows):
                    out[f"{key}#expert{expert}"] = local[index:index + 1]
                continue
        out[key] = value
    return out


def _local_rows(value: torch.Tensor, rows: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's tensor and the expert ids of its rows (an FSDP shard holds a block of them)."""
    if not isinstance(value, DTensor):
        return value, rows
    if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != 0) for p in value.placements):
        return local_part(value), ()  # not a row split (no such layout today): left to DCP as a whole
    held = local_rows(value)
    return local_part(value), rows[held.start:held.stop]


def _param_name(key: str, rows_by_name: dict[str, tuple[int, ...]], *, optimizer: bool) -> str | None:
    if not optimizer:
        return key
    if not key.startswith(_OPTIM_STATE_PREFIX):
        return None
    name = key[len(_OPTIM_STATE_PREFIX):].rsplit(".", 1)[0]  # state.<param name>.<exp_avg|...>
    return name if name in rows_by_name else None


def live_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LiveState:
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    rows = expert_rows_by_name(model)
    whole = {"model": model_state, "optim": optim_state}
    saved = {"model": _split(model_state, rows, optimizer=False), "optim": _split(optim_state, rows, optimizer=True)}
    return LiveState(saved, whole)


def saved_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The model's part of `live_state(...).saved` (without touching the optimizer)."""
    return {"model": _split(get_model_state_dict(model), expert_rows_by_name(model), optimizer=False)}


def apply_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LiveState) -> None:
    restored = state.restored()
    set_state_dict(model, optimizer, model_state_dict=restored["model"], optim_state_dict=restored["optim"],
                   options=OPTIONS)
