"""Reads whole tensors out of one committed hyrun checkpoint, whatever layout wrote it: DCP assembles
each tensor from the shards every rank saved, a few keys at a time, so memory holds one layer.

Which checkpoint: a `step-*` folder, a checkpoint directory (its newest committed step), or a run
directory (`runs/JOB`, whose checkpoints are in `checkpoints/`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from hyrun.runtime.checkpoint.manifest import Manifest
from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.checkpoint.verify import find_damage
from hyrun.runtime.model.config import ModelConfig

MODEL_PREFIX = "model."
OPTIM_STATE_PREFIX = "optim.state."
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointNotFound(ValueError):
    """No committed checkpoint where the user pointed, or a damaged one."""


@dataclass(frozen=True)
class CheckpointRef:
    storage: LocalDirectoryStorage
    step: int

    @property
    def path(self) -> Path:
        return self.storage.committed_path(self.step)


def find_checkpoint(path: Path) -> CheckpointRef:
    """The checkpoint `path` names; the newest committed one for a directory of them or a run dir."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFound(f"{path} is not a directory")
    if path.name.startswith("step-") and (path / "manifest.json").is_file():
        return CheckpointRef(LocalDirectoryStorage(path.parent), int(path.name.removeprefix("step-")))
    for root in (path, path / "checkpoints"):
        steps = LocalDirectoryStorage(root).committed_steps()
        if steps:
            return CheckpointRef(LocalDirectoryStorage(root), steps[-1])
    raise CheckpointNotFound(f"no committed checkpoint in {path} (nor in {path / 'checkpoints'}); a save "
                             "that never committed is not a checkpoint")


class CheckpointTensors:
    """Whole tensors of a verified checkpoint by hyrun key (`blocks.0.moe.experts.w_down#expert5`)."""

    def __init__(self, ref: CheckpointRef, *, verify: bool = True) -> None:
        self.ref = ref
        if verify:
            damage = find_damage(ref.storage, ref.step)
            if damage:
                raise CheckpointNotFound(f"{ref.path} is damaged: {'; '.join(damage)}")
        self.manifest = Manifest.from_json(ref.storage.read_manifest(ref.step))
        # DCP's own index of the checkpoint: every key's global shape and dtype.
        self._metadata = ref.storage.dcp_reader(ref.step).read_metadata().state_dict_metadata

    @property
    def label(self) -> str:
        return str(self.ref.path.resolve())

    def model_config(self, fallback: ModelConfig | None = None) -> ModelConfig:
        """The model the checkpoint was trained with, as its trainer recorded it (or `fallback`)."""
        recorded: dict[str, Any] | None = self.manifest.extra.get("model")
        if recorded is not None:
            return ModelConfig(**recorded)
        if fallback is None:
            raise CheckpointNotFound(f"{self.label} does not record its model (written before hyrun recorded "
                                     "it): pass the job file with --job")
        return fallback

    def has_optimizer_state(self) -> bool:
        return any(key.startswith(OPTIM_STATE_PREFIX) for key in self._metadata)

    def read_model(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return self._read({key: MODEL_PREFIX + key for key in keys})

    def read_moment(self, moment: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """The optimizer's `moment` (exp_avg, exp_avg_sq) of each parameter key, shaped like it."""
        return self._read({key: OPTIM_STATE_PREFIX + _moment_key(key, moment) for key in keys})

    def optimizer_steps(self) -> set[int]:
        """The Adam step counts saved (one per parameter; equal unless a parameter missed updates)."""
        keys = [key for key in self._metadata if key.startswith(OPTIM_STATE_PREFIX) and key.endswith(".step")]
        return {int(value) for value in self._read({key: key for key in keys}).values()}

    def _read(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        missing = [name for name in names.values() if name not in self._metadata]
        if missing:
            raise KeyError(f"{self.label} has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        buffers = {name: _empty_like(self._metadata[name]) for name in names.values()}
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(buffers, storage_reader=self.ref.storage.dcp_reader(self.ref.step), no_dist=True)
        return {key: buffers[name] for key, name in names.items()}


def _moment_key(key: str, moment: str) -> str:
    """`blocks.0.moe.experts.w_down#expert5` -> `blocks.0.moe.experts.w_down.exp_avg#expert5`."""
    name, sep, expert = key.partition("#")
    return f"{name}.{moment}{sep}{expert}"


def _empty_like(meta) -> torch.Tensor:
    if not hasattr(meta, "size"):  # a non-tensor entry (BytesStorageMetadata)
        raise KeyError("not a tensor")
    return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
