"""`hyrun data prepare` tokens/s against a plain single-process `tokenizers` loop over the same files
(read each file, `tokenizer.encode(text)`), in the same run, on the standard library's own sources.
hyrun's figure is the whole command: hashing every input, encoding in a process pool, merging the
parts into shards and writing the manifest. Also shown: one process calling `encode_batch` (the Rust
thread pool on every core), the best a single process gets. Runs alternate; medians are printed.

    python benchmarks/data_prepare.py [--repeats 3] [--workers 0] [--vocab 8192] [--mib 12] [--part-mib 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from hyrun.runtime.data.prepare import PrepareSettings, prepare, worker_count
from hyrun.runtime.data.sources import SourceSpec
from hyrun.runtime.data.tokenizer import train_bpe

def build_corpus(directory: Path, mib: float) -> list[Path]:
    """The first `mib` MiB of the standard library's UTF-8 `.py` files (site-packages left out), copied
    into `directory` so both sides read exactly the same files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] == "site-packages" or "__pycache__" in relative.parts:
            continue
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:  # a few test files are latin-1 on purpose
            continue
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files.append(target)
        total += len(data)
        if total >= mib * 2**20:
            break
    return files


def load(tokenizer_path: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.encode_special_tokens = True  # as hyrun does: "<eos>" written in a file is text
    return tokenizer


def plain_loop(tokenizer_path: Path, files: list[Path]) -> tuple[int, float]:
    tokenizer = load(tokenizer_path)
    started = time.perf_counter()
    tokens = sum(len(tokenizer.encode(p.read_bytes().decode("utf-8"), add_special_tokens=False).ids) for p in files)
    return tokens, time.perf_counter() - started


def batch_in_one_process(tokenizer_path: Path, files: list[Path]) -> tuple[int, float]:
    tokenizer = load(tokenizer_path)
    started = time.perf_counter()
    encodings = tokenizer.encode_batch([p.read_bytes().decode("utf-8") for p in files], add_special_tokens=False)
    return sum(len(e.ids) for e in encodings), time.perf_counter() - started


def hyrun_prepare(tokenizer_path: Path, corpus: Path, workers: int, part_mib: float, out: Path) -> tuple[int, float]:
    settings = PrepareSettings(out=out, sources=(SourceSpec("stdlib", corpus),), tokenizer=tokenizer_path, workers=workers,
                               part_bytes=int(part_mib * 2**20), val_fraction=0.01)
    started = time.perf_counter()
    result = prepare(settings)
    wall_s = time.perf_counter() - started
    documents = sum(s.documents for s in result.manifest.sources.values())
    return result.tokens - documents, wall_s  # EOS tokens are not in the baselines' counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="hyrun's encoding processes (0: one per core)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--part-mib", type=float, default=1.0, help="hyrun's part size")
    parser.add_argument("--mib", type=float, default=12.0, help="corpus size: the standard library's first MiB")
    args = parser.parse_args()

    workers = worker_count(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        files = build_corpus(corpus, args.mib)
        size_mib = sum(p.stat().st_size for p in files) / 2**20
        print(f"corpus: {len(files)} files, {size_mib:.1f} MiB of the standard library's Python sources; "
              f"{len(os.sched_getaffinity(0))} usable cores, hyrun with {workers} workers")
        tokenizer = Path(tmp) / "tokenizer.json"
        started = time.perf_counter()
        train_bpe((p.read_bytes().decode("utf-8") for p in files), args.vocab, tokenizer)
        print(f"byte-level BPE of {args.vocab} tokens trained in {time.perf_counter() - started:.1f} s (not timed below)")
        rates: dict[str, list[float]] = {"plain": [], "batch": [], "hyrun": []}
        counts = set()
        for repeat in range(args.repeats):
            for name, run in (("plain", lambda: plain_loop(tokenizer, files)),
                              ("batch", lambda: batch_in_one_process(tokenizer, files)),
                              ("hyrun", lambda: hyrun_prepare(tokenizer, corpus, args.workers, args.part_mib,
                                                              Path(tmp) / f"out-{repeat}"))):
                tokens, wall_s = run()
                counts.add(tokens)
                rates[name].append(tokens / wall_s)
                print(f"  run {repeat + 1} {name:5s}: {tokens:,} tokens in {wall_s:.2f} s = {tokens / wall_s:,.0f} tokens/s")
        if len(counts) != 1:
            print(f"error: the three paths produced different token counts: {sorted(counts)}")
            return 1
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"single process, encode() per file:          {median['plain']:,.0f} tokens/s")
    print(f"single process, encode_batch (all cores):   {median['batch']:,.0f} tokens/s")
    print(f"hyrun data prepare ({workers} workers, all steps): {median['hyrun']:,.0f} tokens/s")
    print(f"hyrun vs encode_batch in one process: {median['hyrun'] / median['batch']:.2f}x")
    print(f"hyrun data prepare vs a plain single-process tokenizers loop: {median['hyrun'] / median['plain']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
