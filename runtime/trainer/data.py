"""A deterministic synthetic token stream that a model can learn: every token has four possible
successors in a fixed random table, so the best achievable loss is ln 4 ≈ 1.39 nats.

Micro-batch `index` of step `step` is a pure function of (seed, step, index): any rank, in any
generation, after any restart, draws exactly the same tokens, which is what makes a resumed run
and a run on a different number of cards comparable to the uninterrupted one."""

from __future__ import annotations

import torch

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
