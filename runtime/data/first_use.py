"""A job's corpus prepared on first use: `hyrun launch` calls `ensure_prepared` before anything starts,
so a job file that names sources (`data.prepare`) trains on them without a separate `hyrun data
prepare`; a second launch finds the corpus up to date and only re-hashes its inputs."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from .manifest import read_manifest
from .sources import DataError, SourceSpec
from .spec import DataSection, PrepareSpec

PYTHON_PREFIX = "python:"


def source_root(name: str, path: str) -> Path:
    """A source's directory: a path, or `python:PACKAGE` for an installed package's own directory."""
    if not path.startswith(PYTHON_PREFIX):
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"data.prepare.sources.{name}: {root} does not exist")
        return root
    package = path.removeprefix(PYTHON_PREFIX)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.prepare.sources.{name}: {package!r} is not an installed Python package")
    return Path(list(spec.submodule_search_locations)[0])


def ensure_prepared(data: DataSection, say: Callable[[str], None] = lambda text: None) -> Path:
    """The job's prepared directory, preparing (or finishing) it when `data.prepare` says how."""
    directory = data.directory()
    if data.prepare is None:
        if not (directory / "manifest.json").is_file():
            raise DataError(f"data.path {directory} holds no prepared corpus (no manifest.json): run "
                            "`hyrun data prepare ... --out` there, or give data.prepare")
        read_manifest(directory)
        return directory
    from .prepare import PrepareSettings, prepare

    spec: PrepareSpec = data.prepare
    result = prepare(PrepareSettings(
        out=directory, sources=tuple(SourceSpec(name, source_root(name, path)) for name, path in spec.sources.items()),
        globs=tuple(spec.glob), tokenizer=Path(spec.tokenizer).expanduser() if spec.tokenizer else None,
        train_vocab=spec.train_tokenizer, val_fraction=spec.val_fraction,
        # Already prepared: re-hashing the inputs in this process beats starting a pool to find nothing to do.
        workers=1 if (directory / "manifest.json").is_file() else 0,
        force=data.path is None,  # the cache directory is hyrun's own: a stale corpus there is replaced
    ), say=say)  # fmt: skip
    if not result.up_to_date:
        say(f"prepared {directory}: {result.tokens:,} tokens in {result.wall_s:.1f} s")
    return directory


def check_vocabulary(directory: Path, model_vocab_size: int) -> None:
    vocab = read_manifest(directory).tokenizer.vocab_size
    if vocab > model_vocab_size:
        raise DataError(f"the corpus in {directory} has a tokenizer of {vocab} tokens, the model's vocab_size is "
                        f"{model_vocab_size}: set model.overrides.vocab_size to at least {vocab}")
