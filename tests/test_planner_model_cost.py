"""Model cost: parameters agree with the runtime's closed form, FLOPs are 2 per active weight plus the
attention scores, activations shrink under recomputation, per-layer shapes are honoured."""

import dataclasses

import pytest

from hyrun.planner import model_cost as mc
from hyrun.planner.examples import hunyuan_large_shape, small_moe_shape, tiny_shape
from hyrun.planner.training import Precision, TrainingConfig
from hyrun.runtime.coordinator.planning import planner_inputs
from hyrun.runtime.jobfile import parse_job
from hyrun.runtime.model.config import ModelConfig


def test_hunyuan_large_has_389b_parameters():
    assert mc.total_params(hunyuan_large_shape()) == pytest.approx(389e9, rel=0.01)


def test_the_runtime_plans_with_from_config_and_its_parameters_match_the_model():
    # `ModelShape.from_config` is the one ModelConfig -> ModelShape converter: the coordinator's planner
    # inputs come from it, and its parameter count is the model's own closed form.
    job = parse_job({"cluster": {"nodes": [{"name": "n0", "cards": [{"count": 2}]}]},
                     "model": {"preset": "tiny", "overrides": {"hidden_size": 96}}, "training": {"seq_len": 32}})
    shape = planner_inputs(job)[1]
    assert (shape.hidden_size, shape.seq_len) == (96, 32)
    assert mc.total_params(shape) == job.model.config().param_count()
    for preset in ("tiny", "small", "hunyuan-large"):
        config = ModelConfig.from_preset(preset)
        shape = mc.ModelShape.from_config(config, seq_len=64)
        assert mc.total_params(shape) == config.param_count(), preset
        for layer in range(config.num_layers):
            assert mc.layer_params(shape, layer) == config.layer_param_count(layer)


def test_from_config_reads_a_mapping_and_defaults_head_dim():
    shape = mc.ModelShape.from_config(dict(vocab_size=10, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                           expert_ffn_size=32, shared_ffn_size=0, num_experts=4, top_k=1,
                                           max_seq_len=128))
    assert shape.head_dim == 16 and shape.seq_len == 128


def test_flops_are_two_per_active_weight_plus_attention_scores():
    shape = small_moe_shape()
    for layer in range(shape.num_layers):
        norms = 2 * shape.hidden_size + (shape.head_dim * (2 if shape.projects_kv(layer) else 1))
        idle_experts = shape.experts_in_layer(layer) - shape.top_k_in_layer(layer)
        active = mc.layer_params(shape, layer) - norms - idle_experts * mc.expert_params(shape)
        matmuls = mc.layer_flops_per_token(shape, layer) - mc.attention_score_flops_per_token(shape)
        assert matmuls == pytest.approx(2 * active)


def test_flops_grow_with_top_k_sequence_length_and_experts_do_not_cost_flops():
    shape = small_moe_shape()
    more_k = dataclasses.replace(shape, top_k=4)
    longer = dataclasses.replace(shape, seq_len=2 * shape.seq_len)
    more_experts = dataclasses.replace(shape, num_experts=64)
    assert mc.layer_flops_per_token(more_k, 0) > mc.layer_flops_per_token(shape, 0)
    assert mc.layer_flops_per_token(longer, 0) > mc.layer_flops_per_token(shape, 0)
    # more experts at the same top-k: more parameters, (almost) the same FLOPs (only the router grows)
    assert mc.layer_params(more_experts, 0) > 7 * mc.layer_params(shape, 0) / 2
    assert mc.layer_flops_per_token(more_experts, 0) == pytest.approx(mc.layer_flops_per_token(shape, 0), rel=0.01)
    assert mc.training_flops_multiplier(True) > mc.training_flops_multiplier(False)


def test_cross_layer_attention_saves_kv_projections_in_consumer_layers():
    shape = small_moe_shape()
    assert shape.projects_kv(0) and not shape.projects_kv(1)
    assert mc.attention_params(shape, 0) > mc.attention_params(shape, 1)
    assert mc.attention_flops_per_token(shape, 0) > mc.attention_flops_per_token(shape, 1)


def test_activations_shrink_with_recompute_and_grow_with_top_k():
    shape = small_moe_shape()
    full = mc.activation_bytes_per_token(shape, 0, recompute=False)
    assert mc.activation_bytes_per_token(shape, 0, recompute=True) == 2 * shape.hidden_size < full
    more_k = dataclasses.replace(shape, top_k=4)
    assert mc.activation_bytes_per_token(more_k, 0, recompute=False) > full


def test_optimizer_state_is_twelve_bytes_per_parameter_by_default():
    assert mc.optimizer_state_bytes(1e9, Precision()) == 12e9


def test_per_layer_heterogeneity():
    assert mc.layer_heterogeneity(dataclasses.replace(small_moe_shape(), cla_share_every=1)) == 1.0
    tiny = tiny_shape()  # top_k alternates 1, 2
    assert mc.layer_heterogeneity(tiny) > 1.0
    costs = mc.layer_costs(tiny, recompute=False, precision=Precision())
    assert costs.expert_flops_per_token[1] == 2 * costs.expert_flops_per_token[0]
    layered = dataclasses.replace(small_moe_shape(num_layers=4), num_experts=(4, 8, 8, 16), top_k=(1, 2, 2, 2))
    costs = mc.layer_costs(layered, recompute=False, precision=Precision())
    assert list(costs.num_experts) == [4, 8, 8, 16]
    assert costs.dense_params[3] > costs.dense_params[1]  # a bigger router


def test_shape_validation_names_the_field():
    with pytest.raises(ValueError, match="num_experts has 3 entries"):
        dataclasses.replace(small_moe_shape(), num_experts=(8, 8, 8))
    with pytest.raises(ValueError, match="top_k=9 exceeds"):
        dataclasses.replace(small_moe_shape(), top_k=9)
    with pytest.raises(ValueError, match="hidden_size"):
        dataclasses.replace(small_moe_shape(), hidden_size=0)


def test_training_config_batch_arithmetic():
    assert TrainingConfig(micro_batch_size=2, global_batch_tokens=4096 * 8).micro_batches_per_step(4096) == 4
    with pytest.raises(ValueError, match="exactly one"):
        TrainingConfig(micro_batch_size=1)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        TrainingConfig(micro_batch_size=3, global_batch_sequences=8).micro_batches_per_step(64)
    with pytest.raises(ValueError, match="whole number of sequences"):
        TrainingConfig(micro_batch_size=1, global_batch_tokens=100).sequences_per_step(64)
