"""ModelConfig: presets, override errors, and the closed-form counts against built models."""

import pytest
import torch

from hyrun.runtime.model.config import ModelConfig
from hyrun.runtime.model.transformer import MoETransformer

torch.set_num_threads(1)


def built_param_count(config: ModelConfig) -> int:
    return sum(p.numel() for p in MoETransformer(config).parameters())


def test_presets_build_and_validate():
    assert set(ModelConfig.preset_names()) >= {"tiny", "small", "hunyuan-large"}
    tiny = ModelConfig.from_preset("tiny")
    assert tiny.head_dim == tiny.hidden_size // tiny.num_heads
    assert len({tiny.top_k_in_layer(i) for i in range(tiny.num_layers)}) > 1  # layers differ


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="'huge'.*tiny"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="'hiden_size'"):
        ModelConfig.from_preset("tiny", hiden_size=32)


def test_bad_values_raise_actionable_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="num_layers=4"):
        ModelConfig.from_preset("tiny", top_k=[1, 2])
    with pytest.raises(ValueError, match="top_k=9"):
        ModelConfig.from_preset("tiny", top_k=9)


def test_yaml_lists_become_tuples():
    config = ModelConfig.from_preset("tiny", num_experts=[8, 4, 8, 4], top_k=[2, 1, 1, 1])
    assert config.num_experts == (8, 4, 8, 4) and config.experts_in_layer(1) == 4
    hash(config)  # frozen and hashable


@pytest.mark.parametrize("overrides", [
    {},
    {"cla_share_every": 1},
    {"cla_share_every": 3, "num_experts": [8, 4, 6, 2], "top_k": [2, 1, 3, 2]},
    {"qk_norm": False, "shared_ffn_size": 0, "tie_embeddings": True},
])
def test_param_count_formula_matches_built_model(overrides):
    config = ModelConfig.from_preset("tiny", **overrides)
    assert config.param_count() == built_param_count(config)


def test_small_preset_is_a_few_million_params():
    assert 2e6 < ModelConfig.from_preset("small").param_count() < 10e6


def test_hunyuan_large_matches_published_sizes():
    config = ModelConfig.from_preset("hunyuan-large")
    assert config.head_dim == 80
    assert config.param_count() == pytest.approx(389e9, rel=0.01)
    assert config.active_param_count() == pytest.approx(52e9, rel=0.01)
    # GQA 8 of 80 heads × CLA half the layers = 5% of MHA's cache.
    assert config.kv_cache_ratio_vs_mha() == pytest.approx(0.05)
    print(f"hunyuan-large KV cache vs MHA: {config.kv_cache_ratio_vs_mha():.1%}")


def test_cla_consumers_have_no_kv_projections():
    config = ModelConfig.from_preset("tiny", cla_share_every=2)
    model = MoETransformer(config)
    for i, block in enumerate(model.blocks):
        consumer = config.is_kv_consumer(i)
        assert consumer == (i % 2 == 1)
        names = {n for n, _ in block.attention.named_parameters()}
        assert ("k_proj.weight" in names) != consumer and ("v_proj.weight" in names) != consumer
    assert model.pipeline_split_points() == [0, 2]


def test_kv_cache_ratio_matches_formula():
    for share, kv_heads in ((1, 4), (2, 2), (3, 1)):
        config = ModelConfig.from_preset("tiny", cla_share_every=share, num_kv_heads=kv_heads)
        model = MoETransformer(config)
        # Count what a KV cache would actually hold: K/V widths of the layers that project them.
        cached = sum(b.attention.k_proj.out_features for b in model.blocks if b.attention.k_proj is not None)
        full_mha = config.num_layers * config.num_heads * config.head_dim
        assert config.kv_cache_ratio_vs_mha() == pytest.approx(cached / full_mha)


def test_tensor_parallel_plan_names_existing_modules():
    model = MoETransformer(ModelConfig.from_preset("tiny"))
    modules = dict(model.named_modules())
    plan = model.tensor_parallel_plan()
    assert all(name in modules for name in plan)
    assert plan["blocks.0.attention.k_proj"] == "colwise" and "blocks.1.attention.k_proj" not in plan
    assert plan["blocks.1.attention.o_proj"] == "rowwise"
    assert plan["blocks.3.moe.shared_expert.down_proj"] == "rowwise"
