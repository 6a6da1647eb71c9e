"""Held-out loss of a committed checkpoint, per source of the job's corpus, next to a unigram model's.

Reads the checkpoint's whole tensors (whatever layout wrote it) into one `MoETransformer` on this
process's CPU, so it never touches the training processes: `hyrun launch` runs it when a job ends, and
an evaluation beside training can run it on every committed checkpoint."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyrun.runtime.data.job_data import validation_batch
from hyrun.runtime.data.shards import TokenShards
from hyrun.runtime.export.source import CheckpointTensors, find_checkpoint
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.transformer import MoETransformer


@dataclass(frozen=True)
class SourceLoss:
    source: str
    tokens: int  # held-out target tokens scored
    model_loss: float  # nats per token
    unigram_loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.model_loss)


def load_checkpoint_model(path: Path, fallback: ModelConfig | None = None) -> tuple[int, MoETransformer]:
    """(step, the whole model) of the newest committed checkpoint under `path` (a run, checkpoint or
    step directory); routed experts, saved one row per expert, are stacked back."""
    tensors = CheckpointTensors(find_checkpoint(path))
    model = MoETransformer(tensors.model_config(fallback))
    state = model.state_dict()
    keys = set(tensors._metadata)
    whole = [k for k in state if f"model.{k}" in keys]
    values = tensors.read_model(whole)
    for key in state:
        if key in values:
            continue
        rows = sorted((k.removeprefix("model.") for k in keys if k.startswith(f"model.{key}#expert")),
                      key=lambda k: int(k.rsplit("#expert", 1)[1]))
        if not rows:
            continue  # a tied weight saved under its other name
        values[key] = torch.cat(list(tensors.read_model(rows).values()))
    model.load_state_dict(values, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    return tensors.ref.step, model.eval()


def unigram_log_probs(train: TokenShards) -> np.ndarray:
    """log p(token) from the counts of every training token of every source, add-one smoothed."""
    counts = np.ones(train.vocab_size, np.float64)
    for name in train.sources:
        counts += np.bincount(np.asarray(train.source(name).tokens), minlength=train.vocab_size)[:train.vocab_size]
    return np.log(counts / counts.sum())


@torch.no_grad()
def heldout_losses(model: MoETransformer, directory: Path, *, seq_len: int, samples_per_source: int,
                   document_mask: bool = True) -> list[SourceLoss]:
    """Per source: mean next-token loss over its first held-out windows, the model's and the unigram's."""
    val, unigram = TokenShards(directory, "val"), unigram_log_probs(TokenShards(directory, "train"))
    results = []
    for source in val.sources:
        batch = validation_batch(val, source, seq_len, samples_per_source)
        if batch is None:
            continue
        tokens = torch.from_numpy(batch.tokens)
        segments = torch.from_numpy(batch.segment_ids[:, :-1].astype(np.int64)) if document_mask else None
        logits = model(tokens[:, :-1], segments).logits
        targets = tokens[:, 1:]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        results.append(SourceLoss(source, targets.numel(), float(loss),
                                  float(-unigram[targets.numpy()].mean())))
    return results


def evaluate_run(job, run_dir: Path) -> dict:
    """The held-out evaluation of a finished job's newest checkpoint, as summary.json records it."""
    checkpoints = Path(job.checkpoint.directory) if job.checkpoint.directory else run_dir / "checkpoints"
    step, model = load_checkpoint_model(checkpoints, fallback=job.model.config())
    seq_len = job.training.seq_len  # the pretraining length: comparable across stages and runs
    losses = heldout_losses(model, job.data.directory(), seq_len=seq_len,
                            samples_per_source=job.data.validation.samples_per_source,
                            document_mask=job.data.document_mask)
    tokens = sum(s.tokens for s in losses)
    mean = lambda field: sum(getattr(s, field) * s.tokens for s in losses) / max(tokens, 1)  # noqa: E731
    return {"step": step, "seq_len": seq_len, "tokens": tokens, "model_loss": mean("model_loss"),
            "unigram_loss": mean("unigram_loss"),
            "sources": {s.source: {"tokens": s.tokens, "model_loss": s.model_loss, "unigram_loss": s.unigram_loss,
                                   "perplexity": s.perplexity} for s in losses}}
