"""`hyrun export` and `model.init_from`: the hunyuan_v1_moe mapping both ways, logits equal to
`transformers`' HunYuanMoEV1ForCausalLM, a round trip through real jobs under tp=2 and ep=2 that
continues the original run exactly, and the refusals (damaged shard, wrong shape) before launch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyrun.runtime.checkpoint.state import saved_model_state
from hyrun.runtime.export.convert import from_hf, to_hf
from hyrun.runtime.export.hf_layout import differences, hf_config, hf_shapes
from hyrun.runtime.export.index import InitFromError, check_init_from
from hyrun.runtime.export.load import load_export
from hyrun.runtime.export.source import CheckpointTensors, find_checkpoint
from hyrun.runtime.export.write import export_checkpoint
from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.transformer import MoETransformer

from conftest import job_dict

# What transformers' class computes the same way: no CLA, renormalized top-k weights, and a capacity
# no token overflows (transformers has no capacity, so routing is equal only without recycling).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

HF_COMPATIBLE = {"cla_share_every": 1, "router_renormalize": True, "capacity_factor": 16.0}
STEPS = 3


def _model(**overrides) -> tuple[ModelConfig, MoETransformer]:
    config = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    model = MoETransformer(config)
    with torch.no_grad():  # norms away from their all-ones init, so an ordering mistake shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)
    return config, model


@pytest.mark.parametrize("overrides", [{}, HF_COMPATIBLE, {"shared_ffn_size": 0}, {"tie_embeddings": True},
                                       {"shared_ffn_size": 32, "top_k": 2}])
def test_mapping_is_lossless_both_ways_and_names_every_tensor(overrides):
    config, model = _model(**overrides)
    saved = saved_model_state(model)["model"]
    exported = dict(to_hf(config, lambda keys: {key: saved[key] for key in keys}))
    shapes = hf_shapes(config)
    assert list(exported) == list(shapes)  # the written order is the planned one
    assert {name: tuple(t.shape) for name, t in exported.items()} == shapes
    for key, value in saved.items():
        assert torch.equal(from_hf(config, key, exported.__getitem__), value), key


def test_padding_that_is_not_zero_is_refused():
    config, model = _model()  # shared FFN 128 wide, routed experts 64: experts are zero-padded to 128
    saved = saved_model_state(model)["model"]
    exported = dict(to_hf(config, lambda keys: {key: saved[key] for key in keys}))
    exported["model.layers.0.mlp.experts.3.gate_proj.weight"][100, 0] = 1.0
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj.*not zero"):
        from_hf(config, "blocks.0.moe.experts.w_gate_up#expert3", exported.__getitem__)


def test_differences_name_what_transformers_computes_otherwise():
    assert differences(ModelConfig.from_preset("tiny", **HF_COMPATIBLE)) == []
    found = " ".join(differences(ModelConfig.from_preset("tiny")))
    assert "cross-layer attention" in found and "renormalizes" in found
    config = hf_config(ModelConfig.from_preset("tiny"), dtype="bfloat16")
    assert config["use_cla"] is True and config["cla_share_factor"] == 2  # kept, the way Hunyuan-Large writes it


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the optional extra hyrun[export]")


def _logits_of_export(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    transformers = _transformers()
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert type(hf).__name__ == "HunYuanMoEV1ForCausalLM"
    with torch.no_grad():
        return hf(tokens).logits


# ---- through real jobs ---------------------------------------------------------------------------


def _job(name: str, parallelism: dict, **model) -> dict:
    return job_dict(
        name=name,
        cluster={"nodes": [{"name": "node-a", "cards": [{"type": "cpu-sim", "count": 2}]}]},
        model={"preset": "tiny", "overrides": HF_COMPATIBLE, **model},
        parallelism={"tp": 1, "pp": 1, "cp": 1, "ep": 1, **parallelism},
        training={"steps": STEPS, "global_batch": 4},
        checkpoint={"interval_steps": 1, "keep_last": STEPS},
    )


def _launch(launched, write_job, job: dict) -> Path:
    job_file = write_job(job, f"{job['name']}.yaml")
    result = launched("launch", str(job_file), "--no-progress")
    _, stderr = result.proc.communicate(timeout=150)
    assert result.proc.returncode == 0, stderr[-3000:]
    (run,) = (job_file.parent / "runs").glob(f"{job['name']}-*")
    return run


def _export(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "export", str(checkpoint), "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=120)


def _parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    source = CheckpointTensors(find_checkpoint(checkpoint))
    return source.read_model(list(saved_model_state(MoETransformer(source.model_config()))["model"]))


@pytest.mark.timeout(420)
@pytest.mark.parametrize("written_under, resumed_under", [({"tp": 2}, {"tp": 2}), ({"ep": 2}, {"tp": 2})],
                         ids=["tp2", "ep2-onto-tp2"])
def test_export_then_init_from_continues_the_original_run_exactly(written_under, resumed_under, launched,
                                                                   write_job, tmp_path):
    original = _launch(launched, write_job, _job("original", written_under))
    exported = tmp_path / "exported"
    done = _export(original / "checkpoints" / "step-000000002", exported, "--dtype", "fp32", "--training-state")
    assert done.returncode == 0, done.stderr[-3000:]

    # The index's checksums match the files it lists.
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(index["metadata"]["hyrun_files"])
    check_init_from(ModelConfig.from_preset("tiny", **HF_COMPATIBLE), exported, training_state=True)

    continued = _launch(launched, write_job, _job("continued", resumed_under, init_from=str(exported),
                                                  init_training_state=True))
    summary = json.loads((continued / "summary.json").read_text())
    assert sorted(summary["losses"]) == [str(STEPS)]  # it went on at step 3, not from scratch
    want = _parameters(original / "checkpoints" / f"step-{STEPS:09d}")
    got = _parameters(continued / "checkpoints" / f"step-{STEPS:09d}")
    worst = max((want[key] - got[key]).abs().max().item() for key in want)
    assert worst <= 1e-6, worst

    # transformers loads the final step's export and computes hyrun's logits.
    final = tmp_path / "final"
    assert _export(original, final, "--dtype", "fp32").returncode == 0
    source = CheckpointTensors(find_checkpoint(original))
    model = MoETransformer(source.model_config()).eval()
    load_export(model, None, source.model_config(), final, training_state=False)
    for key, value in saved_model_state(model)["model"].items():
        assert torch.equal(value, want[key]), key  # init_from's own load gives the checkpoint's weights
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).logits
    assert (ours - _logits_of_export(final, tokens)).abs().max().item() <= 1e-5


# ---- refusals before launch -----------------------------------------------------------------------


@pytest.fixture
def small_export(tmp_path) -> Path:
    """A weights-only export of a freshly built tiny model, written through a real checkpoint."""
    from hyrun.runtime.checkpoint.state import live_state
    from hyrun.runtime.trainer.loop import build_optimizer
    from hyrun.runtime.jobfile import parse_job
    from hyrun.runtime.checkpoint.manifest import Manifest, hash_file
    from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage
    import dataclasses
    import torch.distributed.checkpoint as dcp

    job = parse_job(_job("small", {}))
    config, model = _model(**HF_COMPATIBLE)
    live = live_state(model, build_optimizer(model, job))
    storage = LocalDirectoryStorage(tmp_path / "ckpt")
    storage.prepare(5)
    dcp.save(live.saved, storage_writer=storage.dcp_writer(5), no_dist=True)
    staging = storage.staging_path(5)
    files = {path.name: hash_file(path) for path in staging.iterdir()}
    storage.write_manifest(5, Manifest(step=5, job_id="small", world_size=1, layout={}, rng_by_rank={}, files=files,
                                       extra={"model": dataclasses.asdict(config)}).to_json())
    storage.commit(5)
    out = tmp_path / "export"
    source = CheckpointTensors(find_checkpoint(tmp_path / "ckpt"))
    export_checkpoint(source, source.model_config(), out, dtype="fp32", max_shard_bytes=1 << 20)
    return out


def test_a_weights_only_export_shards_and_loads_back_into_a_fresh_model(small_export):
    config, reference = _model(**HF_COMPATIBLE)
    index = json.loads((small_export / "model.safetensors.index.json").read_text())
    assert len(index["metadata"]["hyrun_files"]) > 1  # 1 MiB shards: several files
    torch.manual_seed(123)
    fresh = MoETransformer(config)
    load_export(fresh, None, config, small_export, training_state=False)
    for (name, want), got in zip(reference.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(want, got), name


def test_a_corrupted_shard_is_refused_naming_the_file(small_export, write_job, tmp_path):
    shard = sorted(small_export.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InitFromError, match=f"damaged.*{shard.name}: sha256"):
        check_init_from(ModelConfig.from_preset("tiny", **HF_COMPATIBLE), small_export, training_state=False)
    # hyrun launch refuses the job before starting anything (exit 2, the file named).
    job = write_job(_job("refused", {}, init_from=str(small_export)))
    out = subprocess.run([sys.executable, "-m", "hyrun.runtime.cli", "launch", str(job), "--no-progress"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2 and shard.name in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_shape_that_does_not_match_the_preset_is_refused_naming_the_tensor(small_export):
    with pytest.raises(InitFromError, match=r"model\.embed_tokens\.weight is \[256, 64\].*needs \[256, 96\]"):
        check_init_from(ModelConfig.from_preset("tiny", **HF_COMPATIBLE, hidden_size=96, head_dim=24),
                        small_export, training_state=False)
    with pytest.raises(InitFromError, match="no training state"):
        check_init_from(ModelConfig.from_preset("tiny", **HF_COMPATIBLE), small_export, training_state=True)


def test_export_refuses_an_existing_directory_and_leaves_nothing_half_written(small_export, tmp_path):
    source = CheckpointTensors(find_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(source, source.model_config(), small_export)
    assert not list(tmp_path.glob(".*.partial"))


def test_transformers_loads_the_export_and_computes_hyrun_logits(small_export):
    config, reference = _model(**HF_COMPATIBLE)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = reference.eval()(tokens).logits
    assert (ours - _logits_of_export(small_export, tokens)).abs().max().item() <= 1e-5
