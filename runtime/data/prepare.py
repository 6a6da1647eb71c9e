"""`hyrun data prepare`: sources → per source and split a `.bin` of token ids and an index of document
ends (Megatron's indexed-dataset idea), plus `manifest.json`. Parts are encoded by a process pool and
kept on disk under a name that hashes their inputs, so a rerun after a kill or a fixed input encodes
only what is missing; the outputs and the manifest are renamed into place last."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyrun.common.process import process_start_ticks

from . import encode
from .manifest import (FORMAT_VERSION, MANIFEST, SPLITS, InputEntry, Manifest, SourceEntry, SplitEntry,
                       TokenizerEntry, read_manifest, write_manifest)
from .sources import (DataError, InputFile, SourceSpec, find_files, group_pieces, hash_input, is_validation,
                      pieces_of, read_documents, sha256_file)
from .tokenizer import TokenizerInfo, describe, train_bpe, training_key

PART_BYTES = 8 << 20  # a part is a few seconds of one core's work: small enough to lose little on a kill
TOKENIZER_FILE = "tokenizer.json"
PARTS_DIR = ".parts"


@dataclass(frozen=True)
class PrepareSettings:
    out: Path
    sources: tuple[SourceSpec, ...]
    globs: tuple[str, ...] = ()
    field: str = "text"  # JSONL field or Parquet column
    tokenizer: Path | None = None
    train_vocab: int | None = None
    eos_token: str | None = None
    val_fraction: float = 0.01
    workers: int = 0  # 0: one per usable core
    part_bytes: int = PART_BYTES
    force: bool = False

    def check(self) -> None:
        if (self.tokenizer is None) == (self.train_vocab is None):
            raise DataError("give exactly one of --tokenizer FILE and --train-tokenizer VOCAB")
        if not 0.0 <= self.val_fraction < 0.5:
            raise DataError(f"--val-fraction {self.val_fraction}: give a share in [0, 0.5)")
        if not self.sources:
            raise DataError("name at least one source: NAME=PATH")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"source names must differ: {', '.join(names)}")
        if self.part_bytes <= 0 or self.workers < 0:
            raise DataError("--part-mib and --workers must be positive")


@dataclass(frozen=True)
class PrepareResult:
    manifest: Manifest
    parts_written: int = 0
    parts_reused: int = 0
    input_bytes: int = 0
    wall_s: float = 0.0
    up_to_date: bool = False  # the directory already held this exact corpus

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.manifest.sources.values())


def worker_count(requested: int) -> int:
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(settings: PrepareSettings, progress: Callable[[int, int], None] = lambda done, total: None,
            say: Callable[[str], None] = lambda text: None) -> PrepareResult:
    """Prepare (or finish preparing) the corpus in `settings.out`; `progress(done_bytes, total_bytes)`."""
    settings.check()
    started = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    files = {spec.name: find_files(spec, settings.globs) for spec in settings.sources}
    workers = worker_count(settings.workers)
    with _pool(workers) as pool:
        say("hashing inputs")
        hashes = _hash_inputs(files, pool)
        plan = _plan_key(settings, files, hashes)
        # Checked before anything is written: a refused run must not touch the corpus already there.
        existing = _existing_manifest(out, plan, settings.force)
        if existing is not None:
            shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # left if a kill came between manifest and clean-up
            return PrepareResult(existing, wall_s=time.perf_counter() - started, up_to_date=True)
        say("training the tokenizer" if settings.train_vocab else "checking the tokenizer")
        tokenizer = _tokenizer(settings, files, hashes)
        tasks = _plan(settings, files, hashes, tokenizer)
        say("encoding")
        counts = _encode_parts(tasks, pool, tokenizer, progress)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    sources = {}
    for spec in settings.sources:
        say(f"writing {spec.name}")
        inputs = [InputEntry(path=f.relpath, bytes=f.size_bytes, sha256=hashes[f.path]) for f in files[spec.name]]
        sources[spec.name] = _merge_source(out, spec, inputs, tasks[spec.name], dtype)
    manifest = Manifest(format_version=FORMAT_VERSION, plan=plan, dtype=np.dtype(dtype).name,
                        val_fraction=settings.val_fraction, sources=sources,
                        tokenizer=TokenizerEntry(path=TOKENIZER_FILE, given_path=_given(settings), sha256=tokenizer.sha256,
                                                 vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                                                 eos_token=tokenizer.eos_token, trained=tokenizer.trained))
    write_manifest(out, manifest)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)  # every part is in the outputs now
    return PrepareResult(manifest, *counts, wall_s=time.perf_counter() - started)


def _plan_key(settings: PrepareSettings, files: dict[str, list[InputFile]], hashes: dict[Path, str]) -> str:
    """Everything the outputs depend on (not the part size: parts concatenate in document order)."""
    tokenizer = {"sha256": sha256_file(settings.tokenizer), "eos": settings.eos_token} if settings.tokenizer else {
        "train_vocab": settings.train_vocab}
    identity = {"version": FORMAT_VERSION, "val": settings.val_fraction, "field": settings.field, "tokenizer": tokenizer,
                "sources": {name: [(f.relpath, hashes[f.path]) for f in fs] for name, fs in files.items()}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _given(settings: PrepareSettings) -> str | None:
    return str(settings.tokenizer.resolve()) if settings.tokenizer else None


class _Inline:
    """The pool's interface in this process (one worker: no process start-up, easier to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def _pool(workers: int):
    if workers == 1:
        return _Inline()
    # Not fork: the parent may hold the tokenizer's thread pool (it trained one) and a progress thread, and a
    # child forked mid-lock can deadlock. Not spawn either: every worker would start Python and re-import the
    # caller's main module. A fork server starts once per process, with the workers' modules already loaded.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["hyrun.runtime.data.encode", "tokenizers"])
    me = os.getpid()
    return ProcessPoolExecutor(workers, mp_context=context, initializer=encode.watch_caller,
                               initargs=(me, process_start_ticks(me)))


def _hash_inputs(files: dict[str, list[InputFile]], pool) -> dict[Path, str]:
    paths = sorted({f.path for fs in files.values() for f in fs})
    return dict(zip(paths, pool.map(hash_input, paths, chunksize=16)))


def _tokenizer(settings: PrepareSettings, files: dict[str, list[InputFile]], hashes: dict[Path, str]) -> TokenizerInfo:
    target = settings.out / TOKENIZER_FILE
    if settings.tokenizer is not None:
        given = describe(settings.tokenizer, settings.eos_token, trained=False)  # checks before copying
        if not target.exists() or sha256_file(target) != given.sha256:
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(settings.tokenizer, tmp)
            tmp.replace(target)
        return describe(target, given.eos_token, trained=False)
    # Trained on the training split only, so held-out documents stay unseen; reused when nothing changed.
    key = training_key(settings.train_vocab, {name: [(f.relpath, hashes[f.path]) for f in fs] for name, fs in files.items()},
                       settings.val_fraction)
    stamp = settings.out / "tokenizer.trained-on.json"
    if not (target.exists() and stamp.exists() and stamp.read_text() == key):
        stamp.unlink(missing_ok=True)

        def texts():
            for fs in files.values():
                for f in fs:
                    for piece in pieces_of(f, settings.part_bytes):
                        for doc_key, text in read_documents(piece, settings.field):
                            if not is_validation(doc_key, settings.val_fraction):
                                yield text

        train_bpe(texts(), settings.train_vocab, target)
        stamp.write_text(key)
    return describe(target, None, trained=True)


def _plan(settings: PrepareSettings, files: dict[str, list[InputFile]], hashes: dict[Path, str],
          tokenizer: TokenizerInfo) -> dict[str, list[encode.PartTask]]:
    """Every source's parts in order. A part's file name hashes everything its bytes depend on, so a part
    on disk is reused only when it would come out the same."""
    tasks = {}
    for name, fs in files.items():
        directory = settings.out / PARTS_DIR / name
        directory.mkdir(parents=True, exist_ok=True)
        pieces = [p for f in fs for p in pieces_of(f, settings.part_bytes)]
        tasks[name] = []
        for part in group_pieces(pieces, settings.part_bytes):
            identity = {"tokenizer": tokenizer.sha256, "eos": tokenizer.eos_id, "val": settings.val_fraction,
                        "field": settings.field, "version": FORMAT_VERSION,
                        "pieces": [(p.file.relpath, hashes[p.file.path], p.start, p.stop) for p in part]}
            part_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
            tasks[name].append(encode.PartTask(directory / f"{part_id}.npz", part, settings.field, settings.val_fraction))
    return tasks


def _existing_manifest(out: Path, plan: str, force: bool) -> Manifest | None:
    if not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    if manifest.plan == plan:
        return manifest
    if not force:
        raise DataError(f"{out} holds a different prepared corpus (other inputs or settings): choose another --out, "
                        "or --force to replace it")
    (out / MANIFEST).unlink()  # from here on the directory does not look prepared until the new manifest lands
    return None


def _encode_parts(tasks: dict[str, list[encode.PartTask]], pool, tokenizer: TokenizerInfo,
                  progress: Callable[[int, int], None]) -> tuple[int, int, int]:
    """Encode the parts not on disk yet; (parts written, parts reused, input bytes). A bad input fails its
    part only: the others are still written (a rerun after the fix redoes just that one) and every failure
    is reported together."""
    all_tasks = [t for ts in tasks.values() for t in ts]
    total = sum(p.size_bytes for t in all_tasks for p in t.pieces)
    todo = [t for t in all_tasks if not t.path.exists()]
    done = total - sum(p.size_bytes for t in todo for p in t.pieces)
    written = 0
    progress(done, total)
    errors: list[str] = []
    loaded = (str(tokenizer.path), tokenizer.sha256, tokenizer.eos_id)
    if isinstance(pool, _Inline):
        outcomes = ((t, encode.run_part(t, *loaded, single_threaded=False)) for t in todo)
    else:
        futures = {pool.submit(encode.run_part, t, *loaded, single_threaded=True): t for t in todo}
        outcomes = ((futures[f], f.result()) for f in as_completed(futures))
    try:
        for task, error in outcomes:
            if error:
                errors.append(error)
            else:
                written += 1
            done += sum(p.size_bytes for p in task.pieces)
            progress(done, total)
    except BaseException:
        # Ctrl-C or a dead worker: parts not started are dropped, not waited for (finished ones stay on disk).
        for future in futures if not isinstance(pool, _Inline) else ():
            future.cancel()
        raise
    if errors:
        raise DataError(f"{len(errors)} of {len(todo)} parts failed (the other parts are kept; rerun after "
                        "fixing):\n  " + "\n  ".join(sorted(set(errors))[:20]))
    return written, len(all_tasks) - len(todo), total


def _merge_source(out: Path, spec: SourceSpec, inputs: list[InputEntry], tasks: Sequence[encode.PartTask],
                  dtype: type) -> SourceEntry:
    """Concatenate the source's parts, in plan order, into one `.bin` and one index per split."""
    directory = out / spec.name
    directory.mkdir(exist_ok=True)
    splits = {}
    for split in SPLITS:
        bin_path, index_path = directory / f"{split}.bin", directory / f"{split}.idx.npy"
        digest, ends, offset = hashlib.sha256(), [np.empty(0, np.int64)], 0
        tmp_bin, tmp_index = bin_path.with_name(bin_path.name + ".tmp"), index_path.with_name(index_path.name + ".tmp")
        with tmp_bin.open("wb") as f:
            for task in tasks:
                part = encode.read_part(task.path)
                data = part[f"{split}_tokens"].astype(dtype).tobytes()  # ids < vocab size: the cast is exact
                f.write(data)
                digest.update(data)
                ends.append(part[f"{split}_ends"] + offset)
                offset += len(part[f"{split}_tokens"])
            os.fsync(f.fileno())
        with tmp_index.open("wb") as f:
            np.save(f, np.concatenate(ends))
            os.fsync(f.fileno())
        tmp_bin.replace(bin_path)
        tmp_index.replace(index_path)
        splits[split] = SplitEntry(documents=sum(len(e) for e in ends), tokens=offset,
                                   bin=bin_path.relative_to(out).as_posix(), index=index_path.relative_to(out).as_posix(),
                                   bin_sha256=digest.hexdigest(), index_sha256=sha256_file(index_path))
    return SourceEntry(root=str(spec.root.resolve()), inputs=inputs, splits=splits,
                       documents=sum(s.documents for s in splits.values()), tokens=sum(s.tokens for s in splits.values()))
