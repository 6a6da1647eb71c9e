"""`model.init_from`: a fresh run's weights from an exported (Hugging Face layout) directory, resharded
onto whatever this rank holds (a TP or FSDP shard, some experts, some pipeline stages).

Every rank reads the whole tensors it needs, lazily and memory-mapped (safetensors), and copies its
own slice: no collective is needed, so a rank never waits on another to start. The directory's
checksums and shapes were checked before launch (`index.check_init_from`); here a tensor that does
not fit still fails loudly, naming it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from hyrun.runtime.checkpoint.state import apply_state, live_state, saved_model_state
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.tensors import local_part

from .convert import from_hf
from .index import MODEL_INDEX, STATE_INDEX, STATE_INFO, ExportIndex
from .source import MOMENTS

_OPTIM_STATE = "state."


class _Files:
    """Tensors by name from an index's safetensors files, opened once each, read on demand."""

    def __init__(self, directory: Path, index_name: str, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.index = ExportIndex.read(directory / index_name)
        self._handles = {file: stack.enter_context(safe_open(directory / file, framework="pt"))
                         for file in sorted(set(self.index.weight_map.values()))}

    def read(self, name: str) -> torch.Tensor:
        if name not in self.index.weight_map:
            raise KeyError(f"the exported directory has no tensor {name}")
        return self._handles[self.index.weight_map[name]].get_tensor(name).float()


def load_export(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: ModelConfig, directory: Path,
                *, training_state: bool) -> dict[str, Any] | None:
    """Loads the weights (and with `training_state` the optimizer state) into this rank's part of the
    model; returns the saved job state (data position, expert LRs) to restore, or None."""
    with ExitStack() as stack:
        weights = _Files(directory, MODEL_INDEX, stack)
        if not training_state:
            # Only the parameters: the optimizer starts fresh, exactly as in a run from scratch.
            for key, value in saved_model_state(model)["model"].items():
                _fill(key, value, from_hf(config, key, weights.read))
            return None
        info = json.loads((directory / STATE_INFO).read_text())
        moments = _Files(directory, STATE_INDEX, stack)
        live = live_state(model, optimizer)
        for key, value in live.saved["model"].items():
            _fill(key, value, from_hf(config, key, weights.read))
        for key, value in live.saved["optim"].items():
            _fill_optimizer(config, key, value, moments, info["optimizer_step"])
        apply_state(model, optimizer, live)
        return dict(info["extra"])


def _fill_optimizer(config: ModelConfig, key: str, value: Any, moments: _Files, step: int) -> None:
    if not key.startswith(_OPTIM_STATE) or not isinstance(value, torch.Tensor):
        return  # param_groups entries: the job's own settings stand
    name, sep, expert = key[len(_OPTIM_STATE):].partition("#")
    param, _, field = name.rpartition(".")
    if field == "step":
        local_part(value).fill_(step)
    elif field in MOMENTS:
        whole = from_hf(config, param + sep + expert, lambda hf: moments.read(f"{field}.{hf}"))
        _fill(key, value, whole)


def _fill(key: str, target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copies this rank's part of `whole` into `target` (a plain tensor, or a DTensor's local shard)."""
    if tuple(whole.shape) != tuple(target.shape):
        raise ValueError(f"{key}: the export has {list(whole.shape)}, the model {list(target.shape)}")
    if isinstance(target, DTensor):
        shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
        whole = whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
    with torch.no_grad():
        local_part(target).copy_(whole)
