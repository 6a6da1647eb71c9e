"""How the job trains, as far as the planner cares: batch sizes, recomputation and number formats.
The sequence length lives on ModelShape (it shapes attention cost); everything else is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Precision:
    """Bytes per number. Defaults: bf16 weights and activations, fp32 gradient accumulation (summing
    many micro-batches in bf16 loses the low bits of small gradients), AdamW with fp32 master weights
    and two fp32 moments (4 + 4 + 4 bytes per parameter)."""

    param_bytes: int = 2
    grad_bytes: int = 4
    optimizer_bytes_per_param: int = 12
    activation_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("param_bytes", "grad_bytes", "optimizer_bytes_per_param", "activation_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Precision.{name}={value!r} must be a non-negative int (bytes)")


@dataclass(frozen=True)
class TrainingConfig:
    """One optimizer step processes the global batch as micro-batches of `micro_batch_size` sequences;
    give the global batch in sequences or in tokens (a whole number of sequences)."""

    micro_batch_size: int
    global_batch_sequences: int | None = None
    global_batch_tokens: int | None = None
    recompute: bool = False
    precision: Precision = field(default_factory=Precision)

    def __post_init__(self) -> None:
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) \
                or self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={self.micro_batch_size!r} must be a positive int (sequences)")
        if (self.global_batch_sequences is None) == (self.global_batch_tokens is None):
            raise ValueError("give exactly one of global_batch_sequences and global_batch_tokens "
                             f"(got {self.global_batch_sequences!r} and {self.global_batch_tokens!r})")
        for name in ("global_batch_sequences", "global_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int")

    def sequences_per_step(self, seq_len: int) -> int:
        if self.global_batch_sequences is not None:
            return self.global_batch_sequences
        if self.global_batch_tokens % seq_len:
            raise ValueError(f"global_batch_tokens={self.global_batch_tokens} is not a whole number of "
                             f"sequences of seq_len={seq_len}; use a multiple of {seq_len}")
        return self.global_batch_tokens // seq_len

    def micro_batches_per_step(self, seq_len: int) -> int:
        sequences = self.sequences_per_step(seq_len)
        if sequences % self.micro_batch_size:
            raise ValueError(f"global batch of {sequences} sequences is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}; change one of them")
        return sequences // self.micro_batch_size
