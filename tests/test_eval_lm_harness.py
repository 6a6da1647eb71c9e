"""A committed checkpoint scored through the LM Evaluation Harness on a local multiple-choice task
(examples/eval/python_mc.yaml + .jsonl) with the job's tokenizer: hyrun's adapter answers lm-eval's
requests, and the score lands where the evaluation beside training reports it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'hyrun[eval]')")

from hyrun.runtime.jobfile import parse_job  # noqa: E402

from data_corpus import corpus, data_job  # noqa: E402,F401  (corpus is a fixture)

TASK = Path(__file__).resolve().parent.parent / "examples" / "eval" / "python_mc.yaml"


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    import torch

    from hyrun.runtime.checkpoint.checkpointer import Checkpointer
    from hyrun.runtime.checkpoint.settings import CheckpointSettings
    from hyrun.runtime.trainer.loop import RankWork, train
    from hyrun.runtime.trainer.reporting import Reporter

    out = tmp_path_factory.mktemp("lm-eval")
    torch.set_num_threads(1)
    checkpointer = Checkpointer(CheckpointSettings(directory=out / "checkpoints", interval_steps=4), rank=0,
                                world_size=1, job_id="lm-eval")
    train(parse_job(data_job(corpus, steps=4)), RankWork(log_dir=str(out)), Reporter(None), checkpointer)
    checkpointer.wait()
    return out / "checkpoints"


@pytest.mark.timeout(300)
def test_a_checkpoint_scores_a_local_multiple_choice_task(corpus, checkpoint):
    from hyrun.runtime.eval.heldout import load_checkpoint_model
    from hyrun.runtime.eval.lm_harness import run_tasks

    step, model = load_checkpoint_model(checkpoint)
    assert step == 4
    scores = run_tasks(model, corpus, [TASK])
    assert set(scores) == {"hyrun_python_mc"}
    acc = scores["hyrun_python_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 8 == pytest.approx(round(acc * 8))  # a share of the task's 8 questions


def test_the_adapters_log_likelihoods_add_up(corpus, checkpoint):
    """Scoring a text in two pieces gives the same log-likelihood as the whole: the adapter conditions
    the continuation on its context and counts every token once."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from hyrun.runtime.data.manifest import read_manifest
    from hyrun.runtime.eval.heldout import load_checkpoint_model
    from hyrun.runtime.eval.lm_harness import HyrunLM

    _, model = load_checkpoint_model(checkpoint)
    lm = HyrunLM(model, Tokenizer.from_file(str(corpus / "tokenizer.json")), read_manifest(corpus).tokenizer.eos_id)
    text = "import json\nfrom email import message"
    split = lm._encode(text)
    context, continuation = lm.tokenizer.decode(split[:3]), lm.tokenizer.decode(split[3:])
    assert lm._encode(context) + lm._encode(continuation) == split  # the pieces tokenize back alike
    (whole,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    (first, _), (rest, _) = lm.loglikelihood([SimpleNamespace(args=("", context)),
                                               SimpleNamespace(args=(context, continuation))])
    assert math.isfinite(whole) and whole < 0
    assert first + rest == pytest.approx(whole, rel=1e-4)
