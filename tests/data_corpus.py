"""A small real corpus for data tests: the standard library's email and json packages, prepared once per
session with a tokenizer trained on them (about 2 s), and job files that train on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import job_dict

VOCAB = 512


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    import email
    import json

    from hyrun.runtime.data.prepare import PrepareSettings, prepare
    from hyrun.runtime.data.sources import SourceSpec

    out = tmp_path_factory.mktemp("corpus")
    prepare(PrepareSettings(out=out, sources=(SourceSpec("email", Path(email.__file__).parent),
                                              SourceSpec("json", Path(json.__file__).parent)),
                            globs=("*.py",), train_vocab=VOCAB, val_fraction=0.1, workers=1))
    return out


def data_job(corpus: Path, *, steps: int = 12, stages=(), **data) -> dict:
    return job_dict(model={"preset": "tiny", "overrides": {"vocab_size": VOCAB}},
                    training={"steps": steps, "global_batch": 8, "micro_batch": 2, "seq_len": 32,
                              "schedule": {"warmup_steps": 1}},
                    data={"path": str(corpus), "stages": list(stages), **data})
