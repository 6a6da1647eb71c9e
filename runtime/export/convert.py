"""The tensor arithmetic between hyrun's parameter names and layout and the `hunyuan_v1_moe` one, in
both directions (`hf_layout` holds the names and shapes).

hyrun keys are parameter names as checkpoints hold them: `blocks.3.attention.q_proj.weight`, and for
routed experts one key per expert, `blocks.3.moe.experts.w_gate_up#expert5` ([1, hidden, 2·ffn]).
Differences of layout: hyrun stacks each layer's experts with `input @ weight` matrices and gate and
up side by side; the HF layout has one `nn.Linear` weight ([out, in]) per expert and projection. The
shared expert and routed experts share one FFN width there, so the narrower is zero-padded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from hyrun.runtime.model.config import ModelConfig

from .hf_layout import check_supported, intermediate_size, layer_prefix

ReadMany = Callable[[list[str]], dict[str, torch.Tensor]]  # hyrun keys -> whole tensors
ReadOne = Callable[[str], torch.Tensor]  # an HF name -> its tensor

_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(w_gate_up|w_down)(?:#expert(\d+))?$")
_SHARED_KEY = re.compile(r"^blocks\.(\d+)\.moe\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")

# hyrun name (after `blocks.L.`) -> HF name (after `model.layers.L.`): the same tensor. In the order
# `hf_layout.hf_shapes` lists them, which is the order they are written.
_LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.query_layernorm.weight",
    "attention.k_norm.weight": "self_attn.key_layernorm.weight",
    "moe_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.wg.weight",
}
_TOP_RENAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def dense_layer_keys(config: ModelConfig, layer: int) -> list[str]:
    """One layer's hyrun keys other than the routed experts'."""
    keys = [f"blocks.{layer}.{ours}" for ours in _LAYER_RENAMES
            if _held(config, layer, ours)]
    if config.shared_ffn_size > 0:
        keys += [f"blocks.{layer}.moe.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    return keys


def _held(config: ModelConfig, layer: int, ours: str) -> bool:
    """Whether this layer has that parameter: CLA consumers have no K/V, qk_norm off no QK norms."""
    if ours.startswith(("attention.k_", "attention.v_")) and config.is_kv_consumer(layer):
        return False
    return config.qk_norm or not ours.startswith(("attention.q_norm", "attention.k_norm"))


def to_hf(config: ModelConfig, read: ReadMany) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor in `hf_shapes` order; `read` is asked for a layer's dense keys, then for one
    expert's at a time, so memory holds at most that much."""
    check_supported(config)
    size = intermediate_size(config)
    top = read(["embedding.weight"])
    yield "model.embed_tokens.weight", top["embedding.weight"]
    for layer in range(config.num_layers):
        got = read(dense_layer_keys(config, layer))
        src, dst = f"blocks.{layer}.", f"{layer_prefix(layer)}."
        for ours, hf in _LAYER_RENAMES.items():  # in hf_shapes' order
            if src + ours in got:
                yield dst + hf, got[src + ours]
        yield from _shared_to_hf(config, got, src, dst, size)
        for expert in range(config.experts_in_layer(layer)):  # one expert at a time: a layer may exceed RAM
            keys = [f"{src}moe.experts.w_gate_up#expert{expert}", f"{src}moe.experts.w_down#expert{expert}"]
            pair = read(keys)
            gate_up, down = pair[keys[0]][0], pair[keys[1]][0]  # [hidden, 2·ffn], [ffn, hidden]
            ffn = config.expert_ffn_size
            yield f"{dst}mlp.experts.{expert}.gate_proj.weight", _pad_rows(gate_up[:, :ffn].t(), size)
            yield f"{dst}mlp.experts.{expert}.up_proj.weight", _pad_rows(gate_up[:, ffn:].t(), size)
            yield f"{dst}mlp.experts.{expert}.down_proj.weight", _pad_rows(down, size).t()
    last = read(["final_norm.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"]))
    yield "model.norm.weight", last["final_norm.weight"]
    if not config.tie_embeddings:
        yield "lm_head.weight", last["lm_head.weight"]


def _shared_to_hf(config, got, src, dst, size) -> Iterator[tuple[str, torch.Tensor]]:
    h = config.hidden_size
    if config.shared_ffn_size == 0:  # no shared expert: zero weights add exactly nothing
        for name in ("gate_proj", "up_proj"):
            yield f"{dst}mlp.shared_mlp.{name}.weight", torch.zeros(size, h)
        yield f"{dst}mlp.shared_mlp.down_proj.weight", torch.zeros(h, size)
        return
    for name in ("gate_proj", "up_proj"):
        yield f"{dst}mlp.shared_mlp.{name}.weight", _pad_rows(got[f"{src}moe.shared_expert.{name}.weight"], size)
    down = got[f"{src}moe.shared_expert.down_proj.weight"]  # [hidden, ffn]
    yield f"{dst}mlp.shared_mlp.down_proj.weight", _pad_rows(down.t(), size).t()


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])]).contiguous()


def from_hf(config: ModelConfig, key: str, read: ReadOne) -> torch.Tensor:
    """The whole hyrun tensor for `key` (an expert key gives [1, ...]; a stacked expert key without
    `#expertN`, all experts) built from HF tensors. Padding that is not zero is refused: the model
    would not be the one the job describes."""
    if key == "lm_head.weight" and config.tie_embeddings:
        return read("model.embed_tokens.weight")
    if key in _TOP_RENAMES:
        return read(_TOP_RENAMES[key])
    expert = _EXPERT_KEY.match(key)
    if expert:
        layer, which, index = int(expert.group(1)), expert.group(2), expert.group(3)
        experts = [int(index)] if index is not None else range(config.experts_in_layer(layer))
        stacked = [_expert_from_hf(config, layer, which, e, read) for e in experts]
        return torch.stack(stacked)
    shared = _SHARED_KEY.match(key)
    if shared:
        layer, name = int(shared.group(1)), shared.group(2)
        ffn = config.shared_ffn_size
        whole = read(f"{layer_prefix(layer)}.mlp.shared_mlp.{name}.weight")
        if name == "down_proj":
            return _unpad(whole.t(), ffn, f"{layer_prefix(layer)}.mlp.shared_mlp.{name}.weight").t().contiguous()
        return _unpad(whole, ffn, f"{layer_prefix(layer)}.mlp.shared_mlp.{name}.weight")
    match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if match and match.group(2) in _LAYER_RENAMES:
        return read(f"{layer_prefix(int(match.group(1)))}.{_LAYER_RENAMES[match.group(2)]}")
    raise KeyError(f"no hunyuan_v1_moe tensor holds hyrun parameter {key!r}")


def _expert_from_hf(config: ModelConfig, layer: int, which: str, expert: int, read: ReadOne) -> torch.Tensor:
    prefix, ffn = f"{layer_prefix(layer)}.mlp.experts.{expert}", config.expert_ffn_size
    if which == "w_down":
        name = f"{prefix}.down_proj.weight"
        return _unpad(read(name).t(), ffn, name).contiguous()  # [ffn, hidden]
    gate = _unpad(read(f"{prefix}.gate_proj.weight"), ffn, f"{prefix}.gate_proj.weight")
    up = _unpad(read(f"{prefix}.up_proj.weight"), ffn, f"{prefix}.up_proj.weight")
    return torch.cat([gate.t(), up.t()], dim=1).contiguous()  # [hidden, 2·ffn]


def _unpad(tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if tensor.shape[0] > rows and bool(tensor[rows:].any()):
        raise ValueError(f"{name}: rows past the model's FFN width {rows} are not zero; this directory "
                         "holds a wider expert than the job's model")
    return tensor[:rows]
