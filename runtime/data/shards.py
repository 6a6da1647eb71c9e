"""Reading a prepared corpus: per source and split, the token ids memory-mapped and the document ends,
seen as packed samples. Documents lie back to back (each followed by EOS); sample `i` of a source for a
`seq_len` is the window of `seq_len + 1` tokens starting at `i * seq_len` (inputs `[:-1]`, targets
`[1:]`), with the positions where a document starts inside it, so attention can stay inside documents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import SPLITS, Manifest, read_manifest
from .sources import DataError


@dataclass(frozen=True)
class PackedSample:
    tokens: np.ndarray  # int64 [seq_len + 1]
    document_starts: np.ndarray  # int64 positions in the window where a document begins; always starts with 0

    def segment_ids(self) -> np.ndarray:
        """int32 [seq_len + 1]: which document each position belongs to (0 for the one the window opens in);
        tokens may attend to each other only where these are equal."""
        marks = np.zeros(len(self.tokens), np.int32)
        marks[self.document_starts[1:]] = 1
        return np.cumsum(marks, dtype=np.int32)


class SourceTokens:
    """One source's split: `tokens` memory-mapped (never read whole), `ends` the document end offsets."""

    def __init__(self, directory: Path, bin_name: str, index_name: str, dtype: str, tokens: int) -> None:
        self.ends = np.load(directory / index_name, mmap_mode="r")
        # np.memmap refuses an empty file: an empty split (a tiny source's held-out part) is an empty array.
        self.tokens = (np.memmap(directory / bin_name, dtype=np.dtype(dtype), mode="r", shape=(tokens,)) if tokens
                       else np.empty(0, np.dtype(dtype)))
        if len(self.ends) and int(self.ends[-1]) != tokens:
            raise DataError(f"{directory / index_name}: documents end at {int(self.ends[-1])}, the .bin holds {tokens}")

    @property
    def documents(self) -> int:
        return len(self.ends)

    def num_samples(self, seq_len: int) -> int:
        if seq_len < 1:
            raise ValueError(f"seq_len {seq_len} must be positive")
        return max(0, (len(self.tokens) - 1) // seq_len)

    def sample(self, index: int, seq_len: int) -> PackedSample:
        count = self.num_samples(seq_len)
        if not 0 <= index < count:
            raise IndexError(f"sample {index} of {count} (seq_len {seq_len})")
        start, stop = index * seq_len, index * seq_len + seq_len + 1
        tokens = np.asarray(self.tokens[start:stop], dtype=np.int64)
        # Documents ending inside the window (end offset in (start, stop)) start the next one at that position.
        lo, hi = np.searchsorted(self.ends, [start, stop - 1], side="right")
        starts = np.asarray(self.ends[lo:hi], dtype=np.int64) - start
        return PackedSample(tokens, np.concatenate([[0], starts[starts > 0]]).astype(np.int64))

    def document(self, index: int) -> np.ndarray:
        """Document `index`'s tokens, its EOS included."""
        begin = int(self.ends[index - 1]) if index else 0
        return np.asarray(self.tokens[begin:int(self.ends[index])], dtype=np.int64)


class TokenShards:
    """A prepared corpus (`hyrun data prepare`'s output directory), one split of it."""

    def __init__(self, directory: Path | str, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.split = split
        self._sources = {
            name: SourceTokens(self.directory, entry.splits[split].bin, entry.splits[split].index,
                               self.manifest.dtype, entry.splits[split].tokens)
            for name, entry in self.manifest.sources.items()
        }

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self._sources)

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer.eos_id

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    def source(self, name: str) -> SourceTokens:
        try:
            return self._sources[name]
        except KeyError:
            raise DataError(f"no source {name!r} in {self.directory} (has: {', '.join(self._sources)})") from None

    def num_samples(self, seq_len: int) -> dict[str, int]:
        """Packed samples per source: the sizes a `SampleOrder` is built with."""
        return {name: tokens.num_samples(seq_len) for name, tokens in self._sources.items()}

    def sample(self, source: str, index: int, seq_len: int) -> PackedSample:
        return self.source(source).sample(index, seq_len)
