"""The job file's `data:` section (pydantic, like the rest of `runtime/jobfile.py`) and the pure
decisions read from it: which steps each stage covers, the learning-rate schedule that anneals over
the `anneal` stage, and where a corpus prepared on first use is cached.

No `data:` section keeps the synthetic token stream; every field has a default that works."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

STAGE_ORDER = ("pretrain", "anneal", "long_context")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareSpec(_Section):
    """Sources `hyrun launch` prepares before the job starts if the corpus is not there yet."""

    sources: dict[str, str] = Field(
        ..., min_length=1, description="NAME: PATH per source (a file or a directory), or NAME: 'python:PACKAGE' "
        "for the directory of an installed Python package (e.g. python:email, the standard library's own sources)")
    glob: list[str] = Field(default_factory=list, description="keep only files matching (e.g. '*.py')")
    train_tokenizer: int | None = Field(None, ge=256, description="train a byte-level BPE of this many tokens")
    tokenizer: str | None = Field(None, description="or: a Hugging Face tokenizers JSON file")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of documents held out for validation")

    @model_validator(mode="after")
    def _one_tokenizer(self) -> PrepareSpec:
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("give exactly one of train_tokenizer (a vocabulary size) and tokenizer (a JSON file)")
        return self

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class StageSpec(_Section):
    """One stage of training. Stages run in the order pretrain, anneal, long_context (each at most once)."""

    name: Literal["pretrain", "anneal", "long_context"] = Field(
        ..., description="pretrain; anneal: the learning rate falls to 1/10 of peak over it; long_context: "
        "its own seq_len and rope_base")
    steps: int | None = Field(None, ge=1, description="optimizer steps in the stage")
    fraction: float | None = Field(None, gt=0, lt=1, description="or: this share of training.steps")
    mixture: dict[str, float] | None = Field(None, description="weight per source; default: the data section's")
    seq_len: int | None = Field(None, ge=2, description="long_context: tokens per sequence")
    rope_base: float | None = Field(None, gt=1, description="long_context: the RoPE base from this stage on")

    @model_validator(mode="after")
    def _fields_fit_the_stage(self) -> StageSpec:
        if self.steps is not None and self.fraction is not None:
            raise ValueError(f"stage {self.name}: give steps or fraction, not both")
        if self.name != "long_context" and (self.seq_len is not None or self.rope_base is not None):
            raise ValueError(f"stage {self.name}: seq_len and rope_base belong to the long_context stage")
        _check_mixture(self.mixture or {}, f"stage {self.name}")
        return self


class ValidationSpec(_Section):
    samples_per_source: int = Field(32, ge=1, description="held-out sequences per source in each evaluation")
    every_checkpoint: bool = Field(False, description="score every committed checkpoint in a process beside "
                                   "training (RUN_DIR/eval.jsonl); the final one is always scored at the end")
    regression_margin: float = Field(0.02, ge=0, description="the HyrunEvalWorse alert fires when a source's held-out "
                                     "loss is this much (a ratio: 0.02 = 2%) above the previous checkpoint's")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="LM Evaluation Harness task YAML files (local "
                                     "data, e.g. examples/eval/python_mc.yaml) scored on every checkpoint beside "
                                     "training; needs the optional extra hyrun[eval]")


class DataSection(_Section):
    """Real data: a corpus `hyrun data prepare` wrote (or `prepare:` writes on first use), read by global
    sample index, so every layout and every resume consumes the same samples in the same order."""

    path: str | None = Field(None, description="the prepared directory (default with prepare: a cache under "
                             "$HYRUN_CACHE or ~/.cache/hyrun/data)")
    prepare: PrepareSpec | None = Field(None, description="prepare the corpus into path on first use")
    mixture: dict[str, float] = Field(default_factory=dict, description="weight per source; empty: in proportion "
                                      "to each source's size")
    seed: int | None = Field(None, ge=0, description="sample order seed; default training.seed")
    document_mask: bool = Field(True, description="attention stays inside each packed document")
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    stages: list[StageSpec] = Field(default_factory=list, description="default: one pretrain stage")
    record_sample_ids: bool = Field(False, description="each rank writes the sample ids of every step to "
                                    "samples-rank-R.jsonl beside its log (tests, audits)")

    @model_validator(mode="after")
    def _corpus_and_stage_order(self) -> DataSection:
        if self.path is None and self.prepare is None:
            raise ValueError("give path (a prepared directory), prepare (sources to prepare), or both")
        _check_mixture(self.mixture, "mixture")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names) or names != sorted(names, key=STAGE_ORDER.index):
            raise ValueError(f"stages {names}: each at most once, in the order {', '.join(STAGE_ORDER)}")
        return self

    def directory(self) -> Path:
        """Where the corpus is: `path`, or the cache directory named by what `prepare` would write."""
        if self.path is not None:
            return Path(self.path).expanduser()
        root = Path(os.environ.get("HYRUN_CACHE", "~/.cache/hyrun")).expanduser()
        return root / "data" / self.prepare.cache_key()


def _check_mixture(mixture: dict[str, float], where: str) -> None:
    if mixture and (any(w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0):
        raise ValueError(f"{where} {mixture}: weights must be >= 0 with a positive sum")


@dataclass(frozen=True)
class StagePlan:
    name: str
    first_step: int  # 1-based, inclusive
    last_step: int
    mixture: dict[str, float] | None  # None: the data section's default
    seq_len: int
    rope_base: float | None  # None: the model's

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1


def plan_stages(data: DataSection, *, steps: int, seq_len: int) -> list[StagePlan]:
    """Each stage's steps; ValueError naming the stage when they do not add up to `steps`.
    A stage without steps or fraction takes what the others leave (at most one may)."""
    stages = data.stages or [StageSpec(name="pretrain")]
    sized = [s.steps if s.steps is not None else (max(1, round(s.fraction * steps)) if s.fraction else None)
             for s in stages]
    open_stages = [s.name for s, n in zip(stages, sized) if n is None]
    given = sum(n for n in sized if n is not None)
    if len(open_stages) > 1:
        raise ValueError(f"stages {', '.join(open_stages)} give neither steps nor fraction; at most one may")
    if open_stages:
        if given >= steps:
            raise ValueError(f"stages take {given} of training.steps={steps}, leaving none for {open_stages[0]}")
        sized = [n if n is not None else steps - given for n in sized]
    elif given != steps:
        raise ValueError(f"stages cover {given} steps, training.steps is {steps}")
    plans, first = [], 1
    for stage, count in zip(stages, sized):
        plans.append(StagePlan(stage.name, first, first + count - 1, stage.mixture,
                               stage.seq_len or seq_len, stage.rope_base))
        first += count
    return plans


def stage_of(plans: list[StagePlan], step: int) -> StagePlan:
    for plan in plans:
        if plan.first_step <= step <= plan.last_step:
            return plan
    return plans[-1]  # steps past the end stay in the last stage


def anneal_schedule(schedule, plans: list[StagePlan]):
    """The LR schedule with its anneal covering the `anneal` stage exactly (the LR reaches 1/10 of peak
    on the stage's last step and stays there through any stage after it); unchanged without one."""
    anneal = next((p for p in plans if p.name == "anneal"), None)
    if anneal is None:
        return schedule
    return replace(schedule, total_steps=anneal.last_step, anneal_fraction=anneal.steps / anneal.last_step,
                   anneal_end_ratio=0.1, decay_end_ratio=max(schedule.decay_end_ratio, 0.1))


def check_data_fits(data: DataSection, training, max_seq_len: int) -> None:
    """Cross-section checks (stages against training.steps, the anneal against warmup, sequence lengths
    against the model); ValueError naming what does not fit."""
    plans = plan_stages(data, steps=training.steps, seq_len=training.seq_len)
    try:
        anneal_schedule(training.lr_schedule(), plans)
    except ValueError as error:
        raise ValueError(f"the anneal stage does not fit the schedule: {error}") from None
    for plan in plans:
        if plan.seq_len > max_seq_len:
            raise ValueError(f"stage {plan.name}: seq_len {plan.seq_len} exceeds the model's max_seq_len "
                             f"{max_seq_len} (set model.overrides.max_seq_len)")
