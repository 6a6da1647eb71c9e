"""hyrun's MoE model in the Hugging Face `hunyuan_v1_moe` layout: the config.json it becomes, the name
and shape of every tensor, and what the `transformers` class computes differently.

Torch-free on purpose: the launcher checks an `init_from` directory against the job's preset with it
before any process starts, and that path must not import torch.

The tensor layout is the published one (per-expert `mlp.experts.E.{gate,up,down}_proj.weight`, which
inference engines read and `transformers` fuses on load). Where hyrun's model has something the
`transformers` class lacks, the config says it the way Tencent's own Hunyuan-Large config does
(`use_cla`, `cla_share_factor`, `moe_intermediate_size`, `moe_random_routing_dropped_token`) and
`differences()` names it; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hyrun.runtime.model.config import ModelConfig

MODEL_TYPE = "hunyuan_v1_moe"
ARCHITECTURE = "HunYuanMoEV1ForCausalLM"
FORMAT = "hyrun-export/1"
# The router stays fp32 in every export: the transformers class builds its gate in fp32 and routing
# decisions are the most precision-sensitive arithmetic in the model.
FP32_TENSOR_SUFFIXES = ("mlp.gate.wg.weight",)


class UnsupportedModel(ValueError):
    """A model the `hunyuan_v1_moe` layout cannot hold at all (not merely computes differently)."""


def intermediate_size(config: ModelConfig) -> int:
    """One FFN width for shared and routed experts (the HF class has one): the wider of the two. The
    narrower is zero-padded, which computes exactly the same (silu(0) · up = 0 through zero rows)."""
    return max(config.expert_ffn_size, config.shared_ffn_size)


def check_supported(config: ModelConfig) -> None:
    experts = {config.experts_in_layer(i) for i in range(config.num_layers)}
    if len(experts) > 1:
        raise UnsupportedModel(
            f"num_experts differs per layer ({config.num_experts}); the hunyuan_v1_moe layout holds one "
            "routed-expert count for every layer")


def differences(config: ModelConfig) -> list[str]:
    """What `transformers`' HunYuanMoEV1ForCausalLM computes differently from hyrun for this model
    (the exported weights are still complete and exact). Empty: the logits match."""
    found = []
    if config.cla_share_every > 1:
        found.append(
            f"cross-layer attention (every {config.cla_share_every} layers share K/V): written as use_cla/"
            "cla_share_factor, which Tencent's modeling_hunyuan.py reads; transformers' class ignores "
            "them and would build K/V projections that consumer layers do not have")
    if not config.router_renormalize:
        found.append(
            "gate weights: hyrun uses the raw softmax probabilities (router_renormalize: false); "
            "transformers renormalizes the top-k weights to sum to 1")
    if not config.qk_norm:
        found.append("no QK-norm (qk_norm: false); transformers' class always normalizes queries and keys")
    return found


def hf_config(config: ModelConfig, *, dtype: str) -> dict[str, Any]:
    """config.json for the exported directory."""
    check_supported(config)
    per_layer_top_k = [config.top_k_in_layer(i) for i in range(config.num_layers)]
    top_k: int | list[int] = per_layer_top_k[0] if len(set(per_layer_top_k)) == 1 else per_layer_top_k
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "dtype": dtype,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": intermediate_size(config),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "attention_head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "attention_bias": False,
        "num_experts": config.experts_in_layer(0),
        "moe_topk": top_k,
        # Tencent's Hunyuan-Large fields, for the loaders that honour them.
        "use_qk_norm": config.qk_norm,
        "use_cla": config.cla_share_every > 1,
        "cla_share_factor": config.cla_share_every,
        "use_mixed_mlp_moe": True,
        "num_shared_expert": 1 if config.shared_ffn_size > 0 else 0,
        "moe_intermediate_size": [config.expert_ffn_size] * config.num_layers,
        "capacity_factor": config.capacity_factor,
        "moe_drop_tokens": False,
        "moe_random_routing_dropped_token": True,  # recycle routing: an overflowing token is moved, not dropped
        "hyrun_model": dataclasses.asdict(config),
    }


def model_config_of(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig an export was written from (its `hyrun_model` field)."""
    if "hyrun_model" not in hf:
        raise ValueError("config.json has no hyrun_model field: not written by hyrun export")
    return ModelConfig(**hf["hyrun_model"])


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every exported tensor's name and shape, in the order they are written (layer by layer)."""
    check_supported(config)
    h, d, size = config.hidden_size, config.head_dim, intermediate_size(config)
    q_width, kv_width = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_layers):
        p = layer_prefix(layer)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_width, h)
        if not config.is_kv_consumer(layer):
            shapes[f"{p}.self_attn.k_proj.weight"] = (kv_width, h)
            shapes[f"{p}.self_attn.v_proj.weight"] = (kv_width, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, q_width)
        if config.qk_norm:
            shapes[f"{p}.self_attn.query_layernorm.weight"] = (d,)
            if not config.is_kv_consumer(layer):
                shapes[f"{p}.self_attn.key_layernorm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.mlp.gate.wg.weight"] = (config.experts_in_layer(layer), h)
        for name in ("gate_proj", "up_proj"):
            shapes[f"{p}.mlp.shared_mlp.{name}.weight"] = (size, h)
        shapes[f"{p}.mlp.shared_mlp.down_proj.weight"] = (h, size)
        for expert in range(config.experts_in_layer(layer)):
            for name in ("gate_proj", "up_proj"):
                shapes[f"{p}.mlp.experts.{expert}.{name}.weight"] = (size, h)
            shapes[f"{p}.mlp.experts.{expert}.down_proj.weight"] = (h, size)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes
