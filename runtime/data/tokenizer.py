"""The tokenizer of a prepared corpus: a Hugging Face `tokenizers` JSON file given by the user, or a
byte-level BPE trained on the corpus itself (lossless: decoding gives back the exact text). Nothing is
fetched from a hub. The end-of-document token is a special token every document is followed by."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .sources import DataError, sha256_file

EOS_TOKEN = "<eos>"
# Tried in order when the user names none: the spellings common tokenizer files use.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "[SEP]")


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str
    trained: bool

    def to_json(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token, "trained": self.trained}


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for a malformed file
        raise DataError(f"{path}: not a Hugging Face tokenizers JSON file: {error}") from None


def describe(path: Path, eos_token: str | None, trained: bool) -> TokenizerInfo:
    tokenizer = load_tokenizer(path)
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for candidate in candidates:
        eos_id = tokenizer.token_to_id(candidate)
        if eos_id is not None:
            return TokenizerInfo(path, sha256_file(path), tokenizer.get_vocab_size(with_added_tokens=True), eos_id,
                                 candidate, trained)
    raise DataError(f"{path}: no end-of-document token among {', '.join(candidates)}; name one with --eos-token")


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE of `vocab_size` tokens (`<eos>` is id 0) and save it to `out` atomically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 258 tokens (256 bytes + <eos>)")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: decode(encode(text)) == text, byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(tokenizer.to_str(pretty=False))
    tmp.replace(out)


def training_key(vocab_size: int, inputs: dict[str, list[tuple[str, str]]], val_fraction: float) -> str:
    """What a trained tokenizer depends on; a rerun with the same key reuses the saved one."""
    return json.dumps({"vocab_size": vocab_size, "val_fraction": val_fraction, "inputs": inputs}, sort_keys=True)
