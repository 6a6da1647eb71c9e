"""Where documents come from: `NAME=PATH` sources, the files they match, the pieces of those files that
make up a *part* (the unit a worker encodes and a rerun skips when it is already on disk), and the
documents inside a piece. Text files are one document each; JSONL is one document per line (a field);
Parquet one per row (a column, read with pyarrow, the optional extra `hyrun[data]`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Input a user can fix (a bad source, an unreadable file, a missing field): printed without a traceback."""


@dataclass(frozen=True)
class SourceSpec:
    name: str
    root: Path


@dataclass(frozen=True)
class InputFile:
    path: Path
    relpath: str  # relative to the source's root: the split and the manifest do not depend on where it lives
    size_bytes: int
    format: str  # "text" | "jsonl" | "parquet"


@dataclass(frozen=True)
class Piece:
    """A range of one file: the whole file (text), bytes [start, stop) (JSONL: the lines that start there),
    or row groups [start, stop) (Parquet)."""

    file: InputFile
    start: int
    stop: int
    size_bytes: int


def parse_source(text: str) -> SourceSpec:
    name, sep, path = text.partition("=")
    if not sep or not _NAME.match(name) or not path:
        raise DataError(f"source {text!r}: write NAME=PATH, NAME of letters, digits, '_', '.', '-' (e.g. code=src/)")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"source {name}: {root} does not exist")
    return SourceSpec(name, root)


def file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def find_files(spec: SourceSpec, globs: Sequence[str] = ()) -> list[InputFile]:
    """The source's files, sorted by relative path (the order every rerun and every split sees)."""
    if spec.root.is_file():
        paths, base = [spec.root], spec.root.parent
    else:
        paths, base = [p for p in spec.root.rglob("*") if p.is_file()], spec.root
    # Hidden files and folders (.git, editors' swap files) are never documents.
    paths = [p for p in paths if not any(part.startswith(".") for part in p.relative_to(base).parts)]
    if globs:
        paths = [p for p in paths if any(fnmatch(p.name, g) or fnmatch(p.relative_to(base).as_posix(), g) for g in globs)]
    if not paths:
        matched = f" matching {', '.join(globs)}" if globs else ""
        raise DataError(f"source {spec.name}: no files{matched} under {spec.root}")
    files = []
    for p in sorted(paths, key=lambda p: p.relative_to(base).as_posix()):
        try:
            size = p.stat().st_size
        except OSError as error:
            raise DataError(f"source {spec.name}: cannot read {p}: {error.strerror}") from None
        files.append(InputFile(p, p.relative_to(base).as_posix(), size, file_format(p)))
    return files


def require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'hyrun[data]' (or pip install pyarrow)") from None
    return pq


def pieces_of(file: InputFile, part_bytes: int) -> list[Piece]:
    """A file cut so that no piece is much larger than `part_bytes` (text files stay whole: one document)."""
    if file.format == "jsonl":
        starts = range(0, max(file.size_bytes, 1), part_bytes)
        return [Piece(file, s, min(s + part_bytes, file.size_bytes), min(part_bytes, file.size_bytes - s)) for s in starts]
    if file.format == "parquet":
        try:
            meta = require_pyarrow().ParquetFile(file.path).metadata
        except DataError:
            raise
        except Exception as error:  # pyarrow raises its own types for a damaged footer
            raise DataError(f"{file.path}: not a readable Parquet file: {error}") from None
        pieces, first, size = [], 0, 0
        for group in range(meta.num_row_groups):
            size += meta.row_group(group).total_byte_size
            if size >= part_bytes or group == meta.num_row_groups - 1:
                pieces.append(Piece(file, first, group + 1, size))
                first, size = group + 1, 0
        return pieces
    return [Piece(file, 0, file.size_bytes, file.size_bytes)]


def group_pieces(pieces: Sequence[Piece], part_bytes: int) -> list[tuple[Piece, ...]]:
    """Consecutive pieces packed into parts of about `part_bytes` (many small files make one part)."""
    parts: list[tuple[Piece, ...]] = []
    current: list[Piece] = []
    size = 0
    for piece in pieces:
        if current and size + piece.size_bytes > part_bytes:
            parts.append(tuple(current))
            current, size = [], 0
        current.append(piece)
        size += piece.size_bytes
    if current:
        parts.append(tuple(current))
    return parts


def read_documents(piece: Piece, field: str) -> Iterator[tuple[str, str]]:
    """(key, text) for every document of the piece; the key names the document for the validation split."""
    file = piece.file
    try:
        if file.format == "jsonl":
            yield from _jsonl_documents(piece, field)
        elif file.format == "parquet":
            yield from _parquet_documents(piece, field)
        else:
            data = file.path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{file.path}: not UTF-8 text (byte {error.start}); leave it out with --glob") from None
            if text:
                yield file.relpath, text
    except OSError as error:
        raise DataError(f"{file.path}: cannot read: {error.strerror or error}") from None


def _jsonl_documents(piece: Piece, field: str) -> Iterator[tuple[str, str]]:
    # A piece owns the lines that *start* inside [start, stop): a line crossing the end belongs to this piece,
    # the partial line at the start belongs to the previous one.
    with piece.file.path.open("rb") as f:
        if piece.start > 0:
            f.seek(piece.start - 1)
            f.readline()
        while (offset := f.tell()) < piece.stop:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            where = f"{piece.file.path} (byte {offset})"
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DataError(f"{where}: not a JSON line: {error}") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(list(record)[:10]) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: no field {field!r} (has: {keys}); choose one with --jsonl-field")
            yield f"{piece.file.relpath}@{offset}", _text_value(record[field], where, field)


def _parquet_documents(piece: Piece, field: str) -> Iterator[tuple[str, str]]:
    pq = require_pyarrow()
    handle = pq.ParquetFile(piece.file.path)
    if field not in handle.schema_arrow.names:
        raise DataError(f"{piece.file.path}: no column {field!r} (has: {', '.join(handle.schema_arrow.names)}); "
                        "choose one with --jsonl-field")
    first_row = sum(handle.metadata.row_group(g).num_rows for g in range(piece.start))
    values = handle.read_row_groups(list(range(piece.start, piece.stop)), columns=[field]).column(0).to_pylist()
    for row, value in enumerate(values, start=first_row):
        yield f"{piece.file.relpath}#{row}", _text_value(value, f"{piece.file.path} (row {row})", field)


def _text_value(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def is_validation(key: str, fraction: float) -> bool:
    """The held-out split, decided by a hash of the document's name: stable across reruns, machines and
    part sizes, and independent of every other document."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def sha256_file(path: Path, block_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def hash_input(path: Path) -> str:
    """An input's SHA-256 (run in the pool's workers, which import only this module and `encode`)."""
    try:
        return sha256_file(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None
