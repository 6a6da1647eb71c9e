"""Training on a prepared corpus: the job file's `data:` section, stages (the anneal's mixture and
learning rate, a long-context stage's sequence length and RoPE base), and every step reading the same
global sample ids whatever the layout (see test_data_resume.py for evictions, a drain and a resume)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from hyrun.runtime.jobfile import JobFileError, parse_job

from conftest import job_dict
from data_corpus import corpus, data_job  # noqa: F401  (corpus is a fixture)

BAD_DATA = {
    "no corpus": ({}, "data"),
    "stages out of order": ({"path": "x", "stages": [{"name": "anneal", "steps": 2}, {"name": "pretrain"}]}, "data"),
    "seq_len outside long_context": ({"path": "x", "stages": [{"name": "pretrain", "seq_len": 64}]}, "data.stages.0"),
    "negative weight": ({"path": "x", "mixture": {"a": -1.0}}, "data"),
    "steps and fraction": ({"path": "x", "stages": [{"name": "anneal", "steps": 2, "fraction": 0.1}]},
                           "data.stages.0"),
    "two open stages": ({"path": "x", "stages": [{"name": "pretrain"}, {"name": "anneal"}]}, "(top level)"),
    "stages do not cover the steps": ({"path": "x", "stages": [{"name": "pretrain", "steps": 3}]}, "(top level)"),
    "long context past max_seq_len": ({"path": "x", "stages": [{"name": "pretrain"}, {"name": "long_context",
                                       "steps": 1, "seq_len": 4096}]}, "(top level)"),
    "prepare without a tokenizer": ({"prepare": {"sources": {"a": "python:email"}}}, "data.prepare"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_section_names_the_field(kind):
    data, field = BAD_DATA[kind]
    with pytest.raises(JobFileError) as error:
        parse_job(job_dict(data=data))
    assert f"  {field}:" in str(error.value), str(error.value)


def test_stages_split_the_steps_and_the_anneal_ends_at_a_tenth_of_peak():
    from hyrun.runtime.data.spec import anneal_schedule, plan_stages
    from hyrun.runtime.model.schedule import lr_at

    job = parse_job(job_dict(training={"steps": 40, "global_batch": 8, "micro_batch": 2, "seq_len": 16},
                             data={"path": "x", "stages": [{"name": "pretrain"}, {"name": "anneal", "fraction": 0.1},
                                                           {"name": "long_context", "steps": 6, "seq_len": 64}]}))
    plans = plan_stages(job.data, steps=40, seq_len=16)
    assert [(p.name, p.first_step, p.last_step, p.seq_len) for p in plans] == [
        ("pretrain", 1, 30, 16), ("anneal", 31, 34, 16), ("long_context", 35, 40, 64)]
    schedule = anneal_schedule(job.training.lr_schedule(), plans)
    peak = job.training.optimizer.lr
    lrs = {step: lr_at(step - 1, schedule) for step in range(1, 41)}
    assert lrs[30] > lrs[31] > lrs[34] == pytest.approx(peak / 10)  # falls over the anneal stage ...
    assert all(lrs[step] == pytest.approx(peak / 10) for step in range(35, 41))  # ... and stays there


def test_anneal_stage_follows_its_mixture_within_one_percent(corpus):
    from hyrun.runtime.data.job_data import JobData

    job = parse_job(data_job(corpus, steps=60, stages=[{"name": "pretrain"}, {"name": "anneal", "steps": 40,
                                                                              "mixture": {"email": 0.3, "json": 0.7}}]))
    data = JobData(job.data, steps=60, global_batch=8, seq_len=32, seed=0)
    counts = Counter()
    for step in range(21, 61):
        rows = data.rows(step, 0, 8)
        assert rows.stage.name == "anneal"
        counts.update(data.sources(step)[j] for j in rows.batch.sources)
    total = sum(counts.values())
    assert abs(counts["email"] / total - 0.3) <= 0.01 and abs(counts["json"] / total - 0.7) <= 0.01, counts


def test_rows_are_the_same_whoever_reads_them(corpus):
    """A step's global batch read whole equals it read micro-batch by micro-batch (any split of ranks)."""
    from hyrun.runtime.data.job_data import JobData

    job = parse_job(data_job(corpus))
    whole = JobData(job.data, steps=12, global_batch=8, seq_len=32, seed=0).rows(5, 0, 8)
    other = JobData(job.data, steps=12, global_batch=8, seq_len=32, seed=0)
    parts = [other.rows(5, first, 2) for first in (6, 2, 4, 0)]
    for part, first in zip(parts, (6, 2, 4, 0)):
        assert (part.batch.tokens == whole.batch.tokens[first:first + 2]).all()
        assert (part.indices == whole.indices[first:first + 2]).all()


@pytest.mark.timeout(240)
def test_training_in_process_switches_stage_and_records_sample_ids(corpus, tmp_path):
    """One rank: the anneal's LR reaches a tenth of peak, the long-context stage reads longer windows with
    the new RoPE base, and every step's sample ids are recorded."""
    from hyrun.runtime.trainer.loop import RankWork, Trainer, train
    from hyrun.runtime.trainer.reporting import Reporter

    job = parse_job(data_job(corpus, record_sample_ids=True, stages=[
        {"name": "pretrain"}, {"name": "anneal", "steps": 4, "mixture": {"json": 1.0}},
        {"name": "long_context", "steps": 2, "seq_len": 64, "rope_base": 1e6}]))
    reporter = Reporter(None)
    model = train(job, RankWork(log_dir=str(tmp_path)), reporter)
    lrs = {r.step: r.lr for r in reporter.history}
    assert lrs[10] == pytest.approx(job.training.optimizer.lr / 10) == lrs[12]
    assert float(model.rope_cos[5, 1]) != float(Trainer(job, RankWork(), Reporter(None)).model.rope_cos[5, 1])
    records = [json.loads(line) for line in (tmp_path / "samples-rank-0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][::4] == list(range(1, 13))
    assert {r["stage"] for r in records if r["step"] in (7, 8, 9, 10)} == {"anneal"}
    assert all(source == "json" for r in records if r["stage"] == "anneal" for source, _ in r["samples"])
    indices = [i for r in records for i in r["indices"]]
    assert indices == list(range(12 * 8))
    assert all(0 < r.loss < 10 for r in reporter.history)


def test_evaluation_beside_training_scores_the_newest_unscored_checkpoint_first():
    from hyrun.runtime.eval.watch import pending_steps

    assert pending_steps([2, 4, 6], {2}) == [6, 4]
    assert pending_steps([], set()) == [] and pending_steps([2], {2}) == []


def test_first_use_errors_name_what_to_fix(corpus, tmp_path):
    from hyrun.runtime.data.first_use import check_vocabulary, ensure_prepared, source_root
    from hyrun.runtime.data.sources import DataError
    from hyrun.runtime.data.spec import DataSection

    with pytest.raises(DataError, match="'no_such_package_here' is not an installed Python package"):
        source_root("x", "python:no_such_package_here")
    assert source_root("email", "python:email").name == "email"
    with pytest.raises(DataError, match="holds no prepared corpus"):
        ensure_prepared(DataSection(path=str(tmp_path)))
    assert ensure_prepared(DataSection(path=str(corpus))) == corpus
    with pytest.raises(DataError, match="set model.overrides.vocab_size to at least 512"):
        check_vocabulary(corpus, 256)
