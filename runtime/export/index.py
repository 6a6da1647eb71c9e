"""The index of an exported directory (Hugging Face's `*.safetensors.index.json`, with a SHA-256 and
size per file added under `metadata`), and the checks `init_from` runs on a directory before launch:
every file intact, every tensor present with the shape the job's model needs. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hyrun.runtime.checkpoint.manifest import FileEntry, check_file, hash_file
from hyrun.runtime.model.config import ModelConfig

from .hf_layout import MODEL_TYPE, UnsupportedModel, hf_shapes

MODEL_INDEX = "model.safetensors.index.json"
STATE_INDEX = "training_state.safetensors.index.json"
STATE_INFO = "training_state.json"
EXPORT_INFO = "hyrun_export.json"


class InitFromError(ValueError):
    """A directory `init_from` cannot start the job's model from; the message names the file or tensor."""


@dataclass(frozen=True)
class ExportIndex:
    weight_map: dict[str, str]  # tensor name -> file
    files: dict[str, FileEntry]  # file -> size and SHA-256

    def to_json(self) -> str:
        total = sum(entry.size_bytes for entry in self.files.values())
        files = {name: {"size_bytes": e.size_bytes, "sha256": e.sha256} for name, e in sorted(self.files.items())}
        return json.dumps({"metadata": {"total_size": total, "hyrun_files": files},
                           "weight_map": dict(sorted(self.weight_map.items()))}, indent=1)

    @classmethod
    def read(cls, path: Path) -> ExportIndex:
        try:
            body = json.loads(path.read_text())
            files = {name: FileEntry(int(e["size_bytes"]), str(e["sha256"]))
                     for name, e in body["metadata"]["hyrun_files"].items()}
            return cls(weight_map=dict(body["weight_map"]), files=files)
        except FileNotFoundError:
            raise InitFromError(f"{path} is missing: not a directory written by `hyrun export`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InitFromError(f"{path} is unreadable or has no checksums: {type(e).__name__}: {e}") from None


def damaged_files(directory: Path, index: ExportIndex) -> list[str]:
    """One line per file that is missing or whose size or SHA-256 differs from the index."""
    found = [check_file(entry, lambda name=name: hash_file(directory / name), name)
             for name, entry in sorted(index.files.items())]
    return [problem for problem in found if problem is not None]


def tensor_shapes(directory: Path, index: ExportIndex) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(set(index.weight_map.values())):
        with safe_open(directory / file, framework="numpy") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_init_from(config: ModelConfig, directory: Path, *, training_state: bool) -> None:
    """Refuses, naming what is wrong, a directory the job's model cannot start from."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InitFromError(f"model.init_from: {directory} is not a directory")
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise InitFromError(f"model.init_from: {directory / 'config.json'} is unreadable: {e}") from None
    if model_type != MODEL_TYPE:
        raise InitFromError(f"model.init_from: {directory} holds a {model_type!r} model, not {MODEL_TYPE!r}")
    indexes = [MODEL_INDEX] + ([STATE_INDEX] if training_state else [])
    if training_state and not (directory / STATE_INDEX).is_file():
        raise InitFromError(f"model.init_training_state: {directory} has no training state; export it with "
                            "`hyrun export --training-state`, or start from the weights alone")
    for name in indexes:
        index = ExportIndex.read(directory / name)
        damage = damaged_files(directory, index)
        if damage:
            raise InitFromError(f"model.init_from: {directory} is damaged, refusing it: {'; '.join(damage)}")
    try:
        expected = hf_shapes(config)
    except UnsupportedModel as e:
        raise InitFromError(f"model.init_from: the job's model cannot be loaded from this layout: {e}") from None
    found = tensor_shapes(directory, ExportIndex.read(directory / MODEL_INDEX))
    for name, shape in expected.items():
        if name not in found:
            raise InitFromError(f"model.init_from: {directory} has no tensor {name}, which the job's model needs")
        if found[name] != shape:
            raise InitFromError(f"model.init_from: tensor {name} is {list(found[name])} in {directory}, the job's "
                                f"model (preset and overrides) needs {list(shape)}")
