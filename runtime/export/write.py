"""`hyrun export`: one committed checkpoint → a Hugging Face `hunyuan_v1_moe` directory.

Streams: tensors are read from the checkpoint a few at a time and written shard by shard, so memory
holds one shard (`max_shard_bytes`) plus one expert, not the model. The directory is built under a
hidden `.NAME.partial` sibling and renamed into place at the end: an export that fails or is killed
never leaves something that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hyrun.runtime.checkpoint.manifest import hash_file
from hyrun.runtime.checkpoint.storage import fsync_path
from hyrun.runtime.model.config import ModelConfig

from .convert import to_hf
from .hf_layout import FORMAT, FP32_TENSOR_SUFFIXES, differences, hf_config, hf_shapes
from .index import EXPORT_INFO, MODEL_INDEX, STATE_INDEX, STATE_INFO, ExportIndex
from .source import MOMENTS, CheckpointTensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Progress = Callable[[int], None]  # bytes just written


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    files: int
    total_bytes: int
    differences: list[str]
    training_state: bool


def export_bytes(config: ModelConfig, dtype: str, *, training_state: bool) -> int:
    """What an export will write (for a progress bar), from shapes alone."""
    shapes = hf_shapes(config)
    model = sum(_nbytes(name, shape, DTYPES[dtype]) for name, shape in shapes.items())
    state = sum(_nbytes(name, shape, torch.float32) for name, shape in shapes.items()) * len(MOMENTS)
    return model + (state if training_state else 0)


def export_checkpoint(source: CheckpointTensors, config: ModelConfig, out: Path, *, dtype: str = "bf16",
                      max_shard_bytes: int = 2 << 30, training_state: bool = False, replace: bool = False,
                      progress: Progress = lambda _: None) -> ExportResult:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --force")
    if training_state and not source.has_optimizer_state():
        raise ValueError(f"{source.label} holds no optimizer state to export")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        shapes = hf_shapes(config)
        model_index = _write_shards(partial, "model", to_hf(config, source.read_model), shapes,
                                    DTYPES[dtype], max_shard_bytes, progress)
        _write_json(partial / MODEL_INDEX, model_index.to_json())
        _write_json(partial / "config.json", json.dumps(hf_config(config, dtype=str(DTYPES[dtype]).removeprefix("torch.")), indent=1))
        indexes = [model_index]
        if training_state:
            indexes.append(_write_training_state(partial, source, config, shapes, max_shard_bytes, progress))
        found = differences(config)
        _write_json(partial / EXPORT_INFO, json.dumps({
            "format": FORMAT, "source": source.label, "step": source.ref.step, "job_id": source.manifest.job_id,
            "dtype": dtype, "created_unix_s": time.time(), "transformers_differences": found,
        }, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    total = sum(e.size_bytes for index in indexes for e in index.files.values())
    return ExportResult(out, sum(len(index.files) for index in indexes), total, found, training_state)


def _write_training_state(directory, source, config, shapes, max_shard_bytes, progress) -> ExportIndex:
    """Adam's moments under the same names prefixed `exp_avg.` / `exp_avg_sq.`, fp32, and the step
    and job state in training_state.json: with them `init_training_state` continues the run exactly."""
    def moments() -> Iterator[tuple[str, torch.Tensor]]:
        for moment in MOMENTS:
            for name, tensor in to_hf(config, lambda keys, m=moment: source.read_moment(m, keys)):
                yield f"{moment}.{name}", tensor

    state_shapes = {f"{m}.{name}": shape for m in MOMENTS for name, shape in shapes.items()}
    index = _write_shards(directory, "training_state", moments(), state_shapes, torch.float32,
                          max_shard_bytes, progress)
    _write_json(directory / STATE_INDEX, index.to_json())
    steps = source.optimizer_steps()
    extra = {key: value for key, value in source.manifest.extra.items() if key != "model"}
    _write_json(directory / STATE_INFO, json.dumps(
        {"step": source.ref.step, "optimizer_step": max(steps) if steps else 0, "extra": extra}, indent=1))
    return index


def _write_shards(directory: Path, prefix: str, tensors: Iterator[tuple[str, torch.Tensor]],
                  shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_bytes: int,
                  progress: Progress) -> ExportIndex:
    """Tensors into `PREFIX-0000i-of-0000n.safetensors`; the split is planned from shapes first so
    every file gets its final name as it is written."""
    from safetensors.torch import save_file

    plan: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = _nbytes(name, shape, dtype)
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    shard_of = {name: i for i, names in enumerate(plan) for name in names}
    file_names = [f"{prefix}-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    pending: dict[str, torch.Tensor] = {}
    files, weight_map = {}, {}
    for name, tensor in tensors:
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"{name}: the checkpoint gives {list(tensor.shape)}, the layout needs {list(shapes[name])}")
        wanted = torch.float32 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype
        pending[name] = tensor.detach().to(wanted).contiguous()
        weight_map[name] = file_names[shard_of[name]]
        if len(pending) == len(plan[shard_of[name]]):
            path = directory / file_names[shard_of[name]]
            save_file(pending, str(path), metadata={"format": "pt"})
            os.chmod(path, 0o644)  # shared like any model directory (safetensors writes 0600)
            fsync_path(path)
            files[path.name] = hash_file(path)
            progress(sum(t.numel() * t.element_size() for t in pending.values()))
            pending = {}
    if pending or len(files) != len(plan):
        raise RuntimeError(f"export incomplete: {len(files)} of {len(plan)} {prefix} files written")
    return ExportIndex(weight_map=weight_map, files=files)


def _nbytes(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * (4 if name.endswith(FP32_TENSOR_SUFFIXES) else dtype.itemsize)


def _write_json(path: Path, text: str) -> None:
    path.write_text(text + "\n")
    fsync_path(path)

