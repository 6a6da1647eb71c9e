"""`manifest.json` of a prepared corpus: what went in (inputs with their SHA-256, the tokenizer), what
came out (per source and split: documents, tokens, the `.bin` and its index with their SHA-256). It is
written last, by rename: a directory without one is not a prepared corpus, whatever else it holds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .sources import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputEntry(_Model):
    path: str  # relative to the source's root
    bytes: int
    sha256: str


class SplitEntry(_Model):
    documents: int
    tokens: int
    bin: str  # relative to the corpus directory
    index: str  # int64 end offset of every document, in tokens (.npy)
    bin_sha256: str
    index_sha256: str


class SourceEntry(_Model):
    root: str
    documents: int
    tokens: int
    inputs: list[InputEntry]
    splits: dict[str, SplitEntry]


class TokenizerEntry(_Model):
    path: str  # the copy inside the corpus directory
    given_path: str | None  # where --tokenizer pointed, if given
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str
    trained: bool


class Manifest(_Model):
    format_version: int
    plan: str  # hash of every part's inputs: equal plans mean a rerun has nothing to do
    dtype: str  # of the token ids in every .bin: uint16 when the vocabulary fits, else uint32
    val_fraction: float
    tokenizer: TokenizerEntry
    sources: dict[str, SourceEntry]


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{directory}: no {MANIFEST}: not a prepared corpus (or its `hyrun data prepare` did "
                        "not finish; rerun it to complete)") from None
    except ValidationError as error:
        raise DataError(f"{path}: not a hyrun data manifest: {error}") from None
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(f"{path}: format version {manifest.format_version}, this hyrun reads {FORMAT_VERSION}")
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST)
