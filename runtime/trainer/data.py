"""The token streams a rank trains on: its job's prepared corpus (`RealTokens`), or without a `data:`
section a deterministic synthetic token stream that a model can learn: every token has four possible
successors in a fixed random table, so the best achievable loss is ln 4 ≈ 1.39 nats.

Micro-batch `index` of step `step` is a pure function of (seed, step, index): any rank, in any
generation, after any restart, draws exactly the same tokens, which is what makes a resumed run
and a run on a different number of cards comparable to the uninterrupted one."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from hyrun.runtime.data.job_data import JobData
from hyrun.runtime.data.sources import DataError

SUCCESSORS = 4


class SyntheticTokens:
    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        if vocab_size < SUCCESSORS:
            raise ValueError(f"vocab_size {vocab_size} is below the {SUCCESSORS} successors per token")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        table_rng = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, SUCCESSORS), generator=table_rng)

    def micro_batches(self, step: int, first: int, count: int, size: int) -> list[torch.Tensor]:
        return [self.micro_batch(step, first + i, size) for i in range(count)]

    def micro_batch(self, step: int, index: int, size: int) -> torch.Tensor:
        """[size, seq_len + 1] tokens: inputs are [:, :-1], targets [:, 1:]."""
        rng = torch.Generator().manual_seed(hash_seed(self.seed, step, index))
        tokens = torch.empty(size, self.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab_size, (size,), generator=rng)
        choices = torch.randint(0, SUCCESSORS, (size, self.seq_len), generator=rng)
        for t in range(self.seq_len):
            tokens[:, t + 1] = self.successors[tokens[:, t], choices[:, t]]
        return tokens


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process for str, not int,
    but spell it out so nobody has to know that)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & ((1 << 63) - 1)
    return value


class RealTokens:
    """A job's prepared corpus (`data:`), read by global sample index: micro-batch `index` of `step` is
    rows [index · size, (index + 1) · size) of the step's global batch, whichever rank asks. With the
    document mask on, a micro-batch is [size, 2, seq_len + 1]: tokens, then their segment ids.

    The next step's micro-batches are read on a background thread while this step computes, so the
    step waits only for a hand-over (the rows are a pure function of the step: nothing to undo when a
    prefetched step is never trained)."""

    def __init__(self, data: JobData, *, document_mask: bool, last_step: int, record_to: Path | None = None) -> None:
        self.data = data
        self.document_mask = document_mask
        self.last_step = last_step
        self._record = open(record_to, "a", buffering=1) if record_to is not None else None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="data-prefetch")
        self._next: tuple[tuple, Future] | None = None

    def micro_batches(self, step: int, first: int, count: int, size: int) -> list[torch.Tensor]:
        key = (step, first, count, size)
        pending, self._next = self._next, None
        # One reader at a time: the sample order's caches are not shared between threads.
        read = pending[1].result() if pending is not None else None
        if pending is None or pending[0] != key:
            read = self._read(*key)
        if step < self.last_step:
            following = (step + 1, first, count, size)
            self._next = (following, self._reader.submit(self._read, *following))
        rows_per_batch, batches = read
        for index, rows in enumerate(rows_per_batch):
            self._write_record(step, first + index, rows)
        return batches

    def micro_batch(self, step: int, index: int, size: int) -> torch.Tensor:
        return self.micro_batches(step, index, 1, size)[0]

    def _read(self, step: int, first: int, count: int, size: int) -> tuple[list, list[torch.Tensor]]:
        whole = self.data.rows(step, first * size, count * size)
        tokens = torch.from_numpy(whole.batch.tokens)
        if self.document_mask:
            tokens = torch.stack([tokens, torch.from_numpy(whole.batch.segment_ids.astype(np.int64))], dim=1)
        parts = [(whole.stage.name, whole.indices[i * size:(i + 1) * size], whole.batch.sources[i * size:(i + 1) * size],
                  whole.batch.samples[i * size:(i + 1) * size]) for i in range(count)]
        return parts, list(tokens.split(size))

    def _write_record(self, step: int, index: int, rows) -> None:
        if self._record is None:
            return
        stage, indices, source_ids, samples = rows
        sources = self.data.sources(step)
        self._record.write(json.dumps({
            "step": step, "micro_batch": index, "stage": stage, "indices": indices.tolist(),
            "samples": [[sources[j], int(k)] for j, k in zip(source_ids, samples)]}) + "\n")


def build_data(job, vocab_size: int, record_dir: Path | None = None, rank: int = 0):
    """The job's token stream: its prepared corpus when it has a `data:` section, else the synthetic one."""
    training = job.training
    if job.data is None:
        return SyntheticTokens(vocab_size, training.seq_len, training.seed)
    data = JobData(job.data, steps=training.steps, global_batch=training.global_batch, seq_len=training.seq_len,
                   seed=training.seed)
    if data.vocab_size > vocab_size:
        raise DataError(f"the corpus's tokenizer has {data.vocab_size} tokens, the model's vocab_size is {vocab_size}: "
                        f"set model.overrides.vocab_size to at least {data.vocab_size}")
    record_to = (record_dir / f"samples-rank-{rank}.jsonl"
                 if job.data.record_sample_ids and record_dir is not None else None)
    return RealTokens(data, document_mask=job.data.document_mask, last_step=training.steps, record_to=record_to)
