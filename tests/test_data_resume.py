"""Exactly-once data through failures: a job on a prepared corpus whose ranks record every step's
sample ids reads, step by step, the same ids in the same order as an uninterrupted run, after two
evictions and a drain, and after a resume onto another layout (a pipeline); each job also crosses a
long-context stage (longer sequences, another RoPE base) after a committed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.trainer.loop import RankWork, train
from hyrun.runtime.trainer.reporting import Reporter

from data_corpus import VOCAB, corpus, data_job  # noqa: F401  (corpus is a fixture)

STEPS = 10
STAGES = [{"name": "pretrain"}, {"name": "long_context", "steps": 3, "seq_len": 64, "rope_base": 1e6}]


def _job(corpus: Path, **sections) -> dict:
    job = data_job(corpus, steps=STEPS, stages=STAGES, record_sample_ids=True)
    job["checkpoint"] = {"interval_steps": 2, "keep_last": STEPS}
    job.update(sections)
    return job


def _launch(write_job, launched, tmp_path, job: dict, name: str, ok: bool = True) -> dict:
    result = launched("launch", str(write_job(job, f"{name}.yaml")), "--no-progress")
    _, stderr = result.proc.communicate(timeout=400)  # four generations on a loaded 2-core box
    assert (result.proc.returncode == 0) == ok, stderr[-3000:]
    runs = sorted((tmp_path / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text()) | {"run_dir": str(runs[-1].parent)}


def _recorded(run_dirs: list[str]) -> list[dict]:
    return [json.loads(line) for run in run_dirs for path in sorted(Path(run).glob("generation-*/*/samples-rank-*.jsonl"))
            for line in path.read_text().splitlines()]


def _reference(corpus: Path, tmp_path: Path) -> dict[int, list]:
    """Global sample index → (source, sample) of one uninterrupted single-process run."""
    torch.set_num_threads(1)
    out = tmp_path / "reference"
    out.mkdir()
    train(parse_job(_job(corpus)), RankWork(log_dir=str(out)), Reporter(None))
    return {i: s for r in _recorded_in(out) for i, s in zip(r["indices"], r["samples"])}


def _recorded_in(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "samples-rank-0.jsonl").read_text().splitlines()]


def _assert_same_samples(records: list[dict], reference: dict[int, list]) -> None:
    """Every record (every rank, every generation, a replayed step too) names the reference's sample for
    each index, and every step's whole global batch was read."""
    assert records
    seen: dict[int, set[int]] = {}
    for r in records:
        for index, sample in zip(r["indices"], r["samples"]):
            assert reference[index] == sample, (r["step"], index, sample, reference[index])
        seen.setdefault(r["step"], set()).update(r["indices"])
    global_batch = 8
    for step in range(1, STEPS + 1):
        assert seen.get(step) == set(range((step - 1) * global_batch, step * global_batch)), step


def _assert_stage_switched(run_dirs: list[str]) -> None:
    logs = "".join(p.read_text() for run in run_dirs for p in Path(run).glob("generation-*/*/rank-*.log"))
    assert "stage long_context from step 8: seq_len 64, rope_base 1e+06" in logs
    # The planned checkpoint at the stage's end committed, whatever the interval.
    assert any(7 in LocalDirectoryStorage(Path(run) / "checkpoints").committed_steps() for run in run_dirs)


@pytest.mark.timeout(500)
def test_two_evictions_and_a_drain_read_the_same_samples_as_an_uninterrupted_run(
        corpus, write_job, launched, tmp_path):
    job = _job(corpus, checkpoint={"interval_steps": 2, "keep_last": STEPS}, faults=[
        {"kind": "kill", "node": "node-b", "card": 1, "at_step": 3, "generation": 1},
        {"kind": "kill", "node": "node-a", "card": 1, "at_step": 5, "generation": 2},
        # Past the drain margin within a heartbeat of its step, so the drain's checkpoint commits before
        # the job's last step however fast the box is (at 40 °C/s an unloaded run finished first).
        {"kind": "temperature_ramp", "node": "node-a", "card": 0, "at_step": 6, "c_per_s": 200.0, "generation": 3},
    ])
    summary = _launch(write_job, launched, tmp_path, job, "faults")
    evicted = [e.split(":")[0] for e in summary["evictions"]]
    assert evicted[:2] == ["node-b/card1", "node-a/card1"], summary["evictions"]
    drains = [i for i in summary["incidents"] if i["verdict"] == "drain"]
    assert len(drains) == 1, summary["incidents"]
    assert summary["generations"] == 4
    _assert_same_samples(_recorded([summary["run_dir"]]), _reference(corpus, tmp_path))
    _assert_stage_switched([summary["run_dir"]])


@pytest.mark.timeout(500)
def test_a_resume_onto_a_pipeline_reads_the_same_samples(corpus, write_job, launched, tmp_path):
    """Data parallel on four cards until a kill ends the job (no fault tolerance), then the same job
    again from its checkpoints as pp=2 × dp=2 (segment ids travel between the stages)."""
    checkpoints = {"interval_steps": 2, "keep_last": STEPS, "directory": str(tmp_path / "ckpt")}
    # Every layer its own K/V: the planner does not yet ask the model where a stage may start (with the
    # preset's cross-layer sharing it split 3/1 and 2/2 where stages cannot start), so any split is legal.
    model = {"preset": "tiny", "overrides": {"vocab_size": VOCAB, "cla_share_every": 1}}
    first = _launch(write_job, launched, tmp_path, _job(
        corpus, model=model, checkpoint=checkpoints, fault_tolerance={"enabled": False},
        faults=[{"kind": "kill", "node": "node-b", "card": 0, "at_step": 5}]), "dp", ok=False)
    second_job = _job(corpus, model=model, checkpoint=checkpoints, parallelism={"dp": 2, "pp": 2, "tp": 1, "cp": 1, "ep": 1})
    second_job["data"]["validation"] = {"samples_per_source": 4, "every_checkpoint": True}
    second = _launch(write_job, launched, tmp_path, second_job, "pp")
    assert min(int(step) for step in second["losses"]) > 1, second["losses"]  # resumed, not restarted
    runs = [first["run_dir"], second["run_dir"]]
    _assert_same_samples(_recorded(runs), _reference(corpus, tmp_path))
    logs = "".join(p.read_text() for p in Path(second["run_dir"]).glob("generation-*/*/rank-*.log"))
    assert "resumed from step" in logs and '"pp": 2' in logs
    assert "stage long_context from step 8: seq_len 64, rope_base 1e+06" in logs
    assert 7 in LocalDirectoryStorage(tmp_path / "ckpt").committed_steps()
    # The evaluation beside training scored checkpoints in its own process, the newest included; the
    # launcher scored that one too, into summary.json.
    newest = LocalDirectoryStorage(tmp_path / "ckpt").committed_steps()[-1]
    scored = [json.loads(line) for line in (Path(second["run_dir"]) / "eval.jsonl").read_text().splitlines()]
    assert newest in {r["step"] for r in scored} and all("error" not in r for r in scored), scored
    assert all(0 < s["loss"] < 10 for r in scored for s in r["sources"].values()), scored
    assert second["heldout"]["step"] == newest and second["heldout"]["model_loss"] > 0
