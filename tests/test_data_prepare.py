"""`hyrun data prepare` on real text that every machine has (Python's own `email` and `json` sources): a
tokenizer trained on it, shards that decode back to the exact text, a manifest whose checksums hold, a
rerun after a failed or killed run that finishes it and equals a clean run, and the reader's packing."""

from __future__ import annotations

import email
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from hyrun.runtime.data import DataError, Stage, TokenShards
from hyrun.runtime.data.loader import PackedLoader
from hyrun.runtime.data.manifest import read_manifest
from hyrun.runtime.data.prepare import PARTS_DIR, PrepareSettings, prepare
from hyrun.runtime.data.sources import SourceSpec, is_validation, parse_source

EMAIL = Path(email.__file__).parent  # 28 files, ~380 KB
JSON = Path(json.__file__).parent  # 5 files
VOCAB = 600
VAL = 0.2  # large enough that a few dozen files give every source a held-out part


def _texts(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_bytes().decode("utf-8") for p in sorted(root.rglob("*.py"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A copy of the standard-library files (so tests may break one) plus a JSONL source made of them."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(EMAIL, root / "email", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(JSON, root / "json", ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "docs.jsonl").open("w") as f:
        for name, text in _texts(EMAIL).items():  # 28 lines of ~14 KB: pieces cut lines apart
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    return root


def _settings(corpus: Path, out: Path, **overrides) -> PrepareSettings:
    sources = (SourceSpec("email", corpus / "email"), SourceSpec("json", corpus / "json"),
               SourceSpec("lines", corpus / "docs.jsonl"))
    values = dict(out=out, sources=sources, globs=("*.py", "*.jsonl"), train_vocab=VOCAB, val_fraction=VAL,
                  workers=1, part_bytes=48 << 10)
    return PrepareSettings(**(values | overrides))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    result = prepare(_settings(corpus, out))
    assert result.parts_written > 3 and result.parts_reused == 0 and not result.up_to_date
    return out


def _expected(corpus: Path) -> dict[str, dict[str, list[str]]]:
    """Per source and split, the documents in the order the shards must hold them."""
    # An empty file (email/mime/__init__.py) is no document.
    keyed = {name: [(k, t) for k, t in _texts(corpus / name).items() if t] for name in ("email", "json")}
    offset, lines = 0, []
    for line in (corpus / "docs.jsonl").read_bytes().splitlines(keepends=True):
        lines.append((f"docs.jsonl@{offset}", json.loads(line)["text"]))
        offset += len(line)
    keyed["lines"] = lines
    return {name: {split: [text for key, text in docs if is_validation(key, VAL) == (split == "val")]
                   for split in ("train", "val")} for name, docs in keyed.items()}


def test_shards_decode_to_the_exact_text(prepared, corpus):
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    for split in ("train", "val"):
        shards = TokenShards(prepared, split)
        assert shards.vocab_size == VOCAB and shards.eos_id == tokenizer.token_to_id("<eos>")
        for name, expected in _expected(corpus).items():
            docs = shards.source(name)
            assert docs.documents == len(expected[split]) > 0, (name, split)
            for i, text in enumerate(expected[split]):
                ids = docs.document(i)
                assert ids[-1] == shards.eos_id and shards.eos_id not in ids[:-1]
                assert tokenizer.decode(ids[:-1].tolist()) == text, (name, split, i)


def test_manifest_records_inputs_tokenizer_and_outputs_with_checksums(prepared, corpus):
    manifest = read_manifest(prepared)
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert manifest.dtype == "uint16" and manifest.tokenizer.trained and manifest.tokenizer.vocab_size == VOCAB
    assert manifest.tokenizer.sha256 == sha(prepared / manifest.tokenizer.path)
    email_inputs = {i.path: i for i in manifest.sources["email"].inputs}
    assert set(email_inputs) == set(_texts(corpus / "email")) and len(email_inputs) > 20
    for path, entry in email_inputs.items():
        assert entry.sha256 == sha(corpus / "email" / path) and entry.bytes == (corpus / "email" / path).stat().st_size
    for source in manifest.sources.values():
        assert source.tokens == sum(s.tokens for s in source.splits.values())
        for split in source.splits.values():
            assert split.bin_sha256 == sha(prepared / split.bin) and split.index_sha256 == sha(prepared / split.index)
            assert (prepared / split.bin).stat().st_size == 2 * split.tokens
            ends = np.load(prepared / split.index)
            assert ends.dtype == np.int64 and len(ends) == split.documents and ends[-1] == split.tokens
    assert not (prepared / PARTS_DIR).exists()  # parts are removed once the outputs hold them


def test_packed_samples_and_document_starts(prepared):
    shards = TokenShards(prepared)
    docs = shards.source("email")
    seq_len = 256
    assert shards.num_samples(seq_len)["email"] == (len(docs.tokens) - 1) // seq_len
    stream = np.asarray(docs.tokens, dtype=np.int64)
    for i in (0, 1, 7, shards.num_samples(seq_len)["email"] - 1):
        sample = shards.sample("email", i, seq_len)
        assert np.array_equal(sample.tokens, stream[i * seq_len:i * seq_len + seq_len + 1])
        # A document starts at the window's start and right after every EOS inside it.
        after_eos = np.flatnonzero(sample.tokens[:-1] == shards.eos_id) + 1
        assert np.array_equal(sample.document_starts, np.concatenate([[0], after_eos]))
        segments = sample.segment_ids()
        assert segments[0] == 0 and np.all(np.diff(segments) >= 0) and segments[-1] == len(after_eos)
    with pytest.raises(IndexError):
        shards.sample("email", shards.num_samples(seq_len)["email"], seq_len)


def test_an_epoch_of_batches_reads_every_window_once(prepared):
    seq_len = 128
    shards = TokenShards(prepared)
    sizes = shards.num_samples(seq_len)
    stages = [Stage("pretrain", sizes["email"] + sizes["lines"], {"email": 0.5, "lines": 0.5})]
    loader = PackedLoader.open(prepared, 7, stages, seq_len)
    # Two ranks, each reading its own strided indices, together cover the stage.
    seen = {name: [] for name in loader.sources}
    for rank in range(2):
        batch = loader.batch(np.arange(rank, stages[0].samples, 2))
        assert batch.tokens.shape == (len(batch.samples), seq_len + 1) and batch.segment_ids.dtype == np.int32
        for j, sample, tokens in zip(batch.sources, batch.samples, batch.tokens):
            expected = shards.sample(loader.sources[j], int(sample), seq_len).tokens
            assert np.array_equal(tokens, expected)
            seen[loader.sources[j]].append(int(sample))
    # Equal weights over a stage as long as both sources: the larger is not finished (no sample twice),
    # the smaller is read whole and wraps into its next epoch.
    small, large = sorted(("email", "lines"), key=lambda name: sizes[name])
    assert len(set(seen[large])) == len(seen[large]) < sizes[large] + 1
    assert set(seen[small]) == set(range(sizes[small]))
    with pytest.raises(DataError, match="does not hold"):
        PackedLoader(shards, 0, [Stage("s", 10, {"books": 1.0})], seq_len)


def test_a_failed_run_keeps_its_parts_and_a_rerun_equals_a_clean_run(prepared, corpus, tmp_path):
    tokenizer = prepared / "tokenizer.json"
    email_only = dict(tokenizer=tokenizer, train_vocab=None)
    clean = prepare(_settings(corpus, tmp_path / "clean", sources=(SourceSpec("email", corpus / "email"),), **email_only))
    broken = tmp_path / "corpus"
    shutil.copytree(corpus / "email", broken / "email")
    victim = broken / "email" / "mime" / "text.py"
    good = victim.read_bytes()
    victim.write_bytes(good + b"\xff\xfe not utf-8")
    out = tmp_path / "resumed"
    settings = _settings(broken, out, sources=(SourceSpec("email", broken / "email"),), **email_only)
    with pytest.raises(DataError, match=r"text\.py: not UTF-8"):
        prepare(settings)
    # Everything else was encoded and kept; nothing looks like a finished corpus.
    kept = sorted((out / PARTS_DIR).rglob("*.npz"))
    assert len(kept) == clean.parts_written - 1
    assert not (out / "manifest.json").exists() and not (out / "email" / "train.bin").exists()
    with pytest.raises(DataError, match="not a prepared corpus"):
        TokenShards(out)
    # What a kill leaves: a worker's half-written part and a half-merged output.
    (kept[0].parent / f"{kept[0].name}.1234.tmp").write_bytes(b"half a part")
    (out / "email").mkdir()
    (out / "email" / "train.bin.tmp").write_bytes(b"half a bin")
    victim.write_bytes(good)
    resumed = prepare(settings)
    assert (resumed.parts_written, resumed.parts_reused) == (1, clean.parts_written - 1)
    _assert_same_corpus(tmp_path / "clean", out)
    again = prepare(settings)
    assert again.up_to_date and again.parts_written == 0


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def test_a_sigkilled_run_is_finished_by_the_same_command(prepared, corpus, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "hyrun.runtime.cli", "data", "prepare", f"email={corpus / 'email'}",
               f"lines={corpus / 'docs.jsonl'}", "--glob", "*.py", "--glob", "*.jsonl", "--out", str(out),
               "--tokenizer", str(prepared / "tokenizer.json"), "--val-fraction", str(VAL), "--workers", "2",
               "--part-mib", "0.02"]  # about 40 parts: the kill lands after the first, long before the last
    # Its own process group: the fork server, the pool's workers and multiprocessing's resource tracker join it.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list((out / PARTS_DIR).rglob("*.npz")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.kill()
        process.wait()
        # Nothing it started outlives it: the workers notice within their watch interval and the rest follows.
        deadline = time.monotonic() + 30
        while _group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_members(process.pid)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finished = (out / "manifest.json").exists()  # only if this box ran all of it within one poll
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "up to date" in rerun.stdout if finished else re.search(r"[1-9]\d* reused", rerun.stdout), rerun.stdout
    clean = tmp_path / "clean"
    subprocess.run(command[:command.index("--out") + 1] + [str(clean)] + command[command.index("--out") + 2:],
                   check=True, capture_output=True, timeout=120)
    _assert_same_corpus(clean, out)


def _assert_same_corpus(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a).model_dump(), read_manifest(b).model_dump()
    for m in (ma, mb):
        for source in m["sources"].values():
            source["root"] = None  # where the inputs lived differs; their names and contents must not
    assert ma == mb
    for source in ma["sources"].values():
        for split in source["splits"].values():
            assert (a / split["bin"]).read_bytes() == (b / split["bin"]).read_bytes()
            assert (a / split["index"]).read_bytes() == (b / split["index"]).read_bytes()


def test_a_process_pool_writes_the_same_bytes(prepared, corpus, tmp_path):
    pooled = tmp_path / "pooled"
    prepare(_settings(corpus, pooled, sources=(SourceSpec("email", corpus / "email"),), workers=2,
                      tokenizer=prepared / "tokenizer.json", train_vocab=None))
    for name in ("train.bin", "train.idx.npy", "val.bin", "val.idx.npy"):
        assert (pooled / "email" / name).read_bytes() == (prepared / "email" / name).read_bytes()


def test_parquet_source(corpus, prepared, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = list(_texts(corpus / "email").values())
    pq.write_table(pa.table({"text": texts}), tmp_path / "email.parquet", row_group_size=5)
    out = tmp_path / "out"
    prepare(PrepareSettings(out=out, sources=(SourceSpec("pq", tmp_path / "email.parquet"),),
                            tokenizer=prepared / "tokenizer.json", val_fraction=0.0, workers=1, part_bytes=32 << 10))
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    docs = TokenShards(out).source("pq")
    assert [tokenizer.decode(docs.document(i)[:-1].tolist()) for i in range(docs.documents)] == texts


def test_a_vocabulary_over_65536_is_stored_as_uint32(corpus, tmp_path):
    from tokenizers import models, pre_tokenizers

    text = (corpus / "json" / "decoder.py").read_text()
    words = sorted(set(text.split()))
    # Real words get ids above 65,535, so a uint16 cast anywhere would show.
    vocab = {f"filler{i}": i for i in range(66_000)} | {w: 66_000 + i for i, w in enumerate(words)}
    vocab |= {"[UNK]": len(vocab), "</s>": len(vocab) + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "big.json"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "decoder.txt").write_text(text)
    result = prepare(PrepareSettings(out=tmp_path / "out", sources=(SourceSpec("t", tmp_path / "in"),),
                                     tokenizer=tmp_path / "big.json", val_fraction=0.0, workers=1))
    assert result.manifest.dtype == "uint32" and result.manifest.tokenizer.eos_token == "</s>"
    document = TokenShards(tmp_path / "out").source("t").document(0)
    assert document.tolist() == tokenizer.encode(text).ids + [vocab["</s>"]] and document.max() > 65_535


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch, tmp_path, prepared):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install 'hyrun\[data\]'"):
        prepare(PrepareSettings(out=tmp_path / "out", sources=(SourceSpec("pq", tmp_path / "a.parquet"),),
                                tokenizer=prepared / "tokenizer.json", workers=1))


def test_bad_input_is_refused_with_an_actionable_message(corpus, prepared, tmp_path):
    tokenizer = prepared / "tokenizer.json"
    with pytest.raises(DataError, match=r"no files matching \*\.rst"):
        prepare(_settings(corpus, tmp_path / "a", globs=("*.rst",)))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl \(byte 0\): no field 'text' \(has: body\)"):
        prepare(PrepareSettings(out=tmp_path / "b", sources=(SourceSpec("j", tmp_path / "bad.jsonl"),), tokenizer=tokenizer,
                                workers=1))
    with pytest.raises(DataError, match="does not exist"):
        parse_source(f"x={tmp_path / 'missing'}")
    with pytest.raises(DataError, match="NAME=PATH"):
        parse_source(str(tmp_path))
    with pytest.raises(DataError, match="exactly one of --tokenizer"):
        prepare(_settings(corpus, tmp_path / "c", tokenizer=tokenizer))
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match="holds a different prepared corpus"):
        prepare(_settings(corpus, prepared, val_fraction=0.1))
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before  # left untouched


def test_cli_prepares_and_reports_errors_without_a_traceback(corpus, prepared, tmp_path):
    from typer.testing import CliRunner

    from hyrun.runtime.cli import app

    runner = CliRunner()
    args = ["data", "prepare", f"json={corpus / 'json'}", "--out", str(tmp_path / "out"), "--tokenizer",
            str(prepared / "tokenizer.json"), "--glob", "*.py", "--workers", "1"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "prepared" in done.output and "json: 5 files" in done.output
    assert "up to date" in runner.invoke(app, args).output
    bad = runner.invoke(app, ["data", "prepare", f"json={corpus / 'json'}", "--out", str(tmp_path / "x"),
                              "--train-tokenizer", "600", "--glob", "*.md"])
    assert bad.exit_code == 2 and "no files matching *.md" in bad.output and "Traceback" not in bad.output
