"""The worker side of `hyrun data prepare`: encode one part (a few MiB of documents) with `encode_batch`,
append the end-of-document token to every document, and write the part's train and validation tokens
and document ends under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from hyrun.common.process import is_same_process

from .sources import DataError, Piece, is_validation, read_documents


@dataclass(frozen=True)
class PartTask:
    path: Path  # where the finished part goes (`<id>.npz`)
    pieces: tuple[Piece, ...]
    field: str
    val_fraction: float


@dataclass(frozen=True)
class PartCounts:
    documents: dict[str, int]  # per split
    tokens: dict[str, int]


_tokenizer = None
_eos_id = -1


_tokenizer_key: tuple[str, str] = ("", "")


def load_tokenizer(tokenizer_path: str, sha256: str, eos_id: int, single_threaded: bool) -> None:
    """Load the tokenizer once per process. Pool workers each take one core: the tokenizer's own thread
    pool would only oversubscribe the cores the process pool already fills."""
    global _tokenizer, _eos_id, _tokenizer_key
    if (tokenizer_path, sha256) == _tokenizer_key:
        return
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    # A document that spells "<eos>" (code about tokenizers does) is text: only the appended id ends a document.
    tokenizer.encode_special_tokens = True
    _tokenizer, _eos_id, _tokenizer_key = tokenizer, eos_id, (tokenizer_path, sha256)


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with EOS after every document, int64 end offset of every document)."""
    ids = [encoding.ids for encoding in _tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    tokens = np.fromiter(chain.from_iterable(x + [_eos_id] for x in ids), dtype=np.uint32, count=total)
    return tokens, ends


def encode_part(task: PartTask) -> PartCounts:
    texts: dict[str, list[str]] = {"train": [], "val": []}
    for piece in task.pieces:
        for key, text in read_documents(piece, task.field):
            texts["val" if is_validation(key, task.val_fraction) else "train"].append(text)
    arrays = {}
    for split, docs in texts.items():
        arrays[f"{split}_tokens"], arrays[f"{split}_ends"] = encode_documents(docs)
    # A killed worker leaves at most a `.tmp` file, which no rerun mistakes for a finished part.
    tmp = task.path.with_name(f"{task.path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    tmp.replace(task.path)
    return PartCounts({s: len(arrays[f"{s}_ends"]) for s in texts}, {s: len(arrays[f"{s}_tokens"]) for s in texts})


def watch_caller(pid: int, start_ticks: int, interval_s: float = 0.5) -> None:
    """Pool initializer: end this worker when the process that asked for it is gone. A worker holds its
    own call queue's write end (and the fork server's liveness pipe), so after a SIGKILLed `hyrun data
    prepare` it would wait for work forever, keeping the fork server alive with it."""

    def watch() -> None:
        while is_same_process(pid, start_ticks):
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="watch-caller", daemon=True).start()


def run_part(task: PartTask, tokenizer_path: str, tokenizer_sha256: str, eos_id: int, *, single_threaded: bool) -> str | None:
    """What a pool worker runs (this module imports only numpy and the readers: a worker starts quickly).
    A bad input is returned as its message, so one bad file does not stop the other parts."""
    try:
        load_tokenizer(tokenizer_path, tokenizer_sha256, eos_id, single_threaded)
        encode_part(task)
        return None
    except DataError as error:
        return str(error)


def read_part(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
