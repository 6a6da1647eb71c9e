"""What the MoE model costs, per layer: parameters, FLOPs per token, activation bytes per token, and
optimizer state. Field names follow the runtime's ModelConfig so `ModelShape.from_config` can read it
without importing the runtime (the planner stays torch-free).

Formulas assume the runtime's architecture: SwiGLU experts (3 matrices), grouped-query attention with
cross-layer K/V sharing, RMSNorm, optional q/k norm, one shared expert plus top-k routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .training import Precision


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expert_ffn_size: int
    shared_ffn_size: int
    num_experts: int | tuple[int, ...]
    top_k: int | tuple[int, ...]
    cla_share_every: int = 1
    seq_len: int = 2048
    qk_norm: bool = True
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "expert_ffn_size", "cla_share_every", "seq_len"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("shared_ffn_size", self.shared_ffn_size, minimum=0)
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.num_layers:
                raise ValueError(f"{name} has {len(value)} entries but num_layers={self.num_layers}; "
                                 "give one int for all layers or one per layer")
            for entry in value if isinstance(value, tuple) else (value,):
                _require_int(name, entry, minimum=1)
        for layer in range(self.num_layers):
            if self.top_k_in_layer(layer) > self.experts_in_layer(layer):
                raise ValueError(f"layer {layer}: top_k={self.top_k_in_layer(layer)} exceeds "
                                 f"num_experts={self.experts_in_layer(layer)}")

    @classmethod
    def from_config(cls, config: Any, *, seq_len: int | None = None) -> "ModelShape":
        """From the runtime's ModelConfig (or any object/mapping with the same field names). The
        training sequence length comes from the job (`seq_len`), else the config's max_seq_len."""
        def get(name: str, default: Any = None) -> Any:
            if isinstance(config, dict):
                return config.get(name, default)
            return getattr(config, name, default)

        head_dim = get("head_dim") or get("hidden_size") // get("num_heads")
        return cls(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_layers=get("num_layers"),
            num_heads=get("num_heads"), num_kv_heads=get("num_kv_heads"), head_dim=head_dim,
            expert_ffn_size=get("expert_ffn_size"), shared_ffn_size=get("shared_ffn_size"),
            num_experts=get("num_experts"), top_k=get("top_k"),
            cla_share_every=get("cla_share_every", 1),
            seq_len=seq_len or get("seq_len") or get("max_seq_len", 2048),
            qk_norm=bool(get("qk_norm", True)), tie_embeddings=bool(get("tie_embeddings", False)))

    def experts_in_layer(self, layer: int) -> int:
        return self.num_experts[layer] if isinstance(self.num_experts, tuple) else self.num_experts

    def top_k_in_layer(self, layer: int) -> int:
        return self.top_k[layer] if isinstance(self.top_k, tuple) else self.top_k

    def projects_kv(self, layer: int) -> bool:
        """Cross-layer attention: only the first layer of each group of `cla_share_every` owns K/V."""
        return layer % self.cla_share_every == 0


# --- parameters -------------------------------------------------------------------------------------

def attention_params(shape: ModelShape, layer: int) -> int:
    h, d = shape.hidden_size, shape.head_dim
    count = 2 * h * shape.num_heads * d + (d if shape.qk_norm else 0)  # q, o projections (+ q norm)
    if shape.projects_kv(layer):
        count += 2 * h * shape.num_kv_heads * d + (d if shape.qk_norm else 0)  # k, v (+ k norm)
    return count


def expert_params(shape: ModelShape) -> int:
    """One routed expert: SwiGLU gate, up and down matrices."""
    return 3 * shape.hidden_size * shape.expert_ffn_size


def dense_layer_params(shape: ModelShape, layer: int) -> int:
    """Parameters every card of a layer's stage holds whole (before TP): norms, attention, the shared
    expert and the router. Routed experts are counted apart because EP splits them."""
    h = shape.hidden_size
    return (2 * h + attention_params(shape, layer) + 3 * h * shape.shared_ffn_size
            + h * shape.experts_in_layer(layer))


def layer_params(shape: ModelShape, layer: int) -> int:
    return dense_layer_params(shape, layer) + shape.experts_in_layer(layer) * expert_params(shape)


def embedding_params(shape: ModelShape) -> int:
    return shape.vocab_size * shape.hidden_size


def head_params(shape: ModelShape) -> int:
    """Final norm plus the output projection (none of its own when tied to the embedding)."""
    return shape.hidden_size + (0 if shape.tie_embeddings else shape.vocab_size * shape.hidden_size)


def total_params(shape: ModelShape) -> int:
    return (embedding_params(shape) + head_params(shape)
            + sum(layer_params(shape, layer) for layer in range(shape.num_layers)))


# --- FLOPs (forward, per token; a matmul of m×k by k×n costs 2mkn) ----------------------------------

def attention_score_flops_per_token(shape: ModelShape) -> float:
    """QKᵀ and attention×V for one query token. Causal: a token attends to (seq_len + 1) / 2 keys on
    average, so the score matmuls cost half of the full square."""
    keys = (shape.seq_len + 1) / 2
    return 2 * 2 * shape.num_heads * shape.head_dim * keys


def attention_flops_per_token(shape: ModelShape, layer: int) -> float:
    """Projections (q, o, and k, v where the layer owns them) plus the score matmuls."""
    h, d = shape.hidden_size, shape.head_dim
    projections = 2 * h * shape.num_heads * d
    if shape.projects_kv(layer):
        projections += 2 * h * shape.num_kv_heads * d
    return 2 * projections + attention_score_flops_per_token(shape)


def shared_expert_flops_per_token(shape: ModelShape) -> float:
    return 2 * 3 * shape.hidden_size * shape.shared_ffn_size


def router_flops_per_token(shape: ModelShape, layer: int) -> float:
    return 2 * shape.hidden_size * shape.experts_in_layer(layer)


def routed_expert_flops_per_token(shape: ModelShape, layer: int) -> float:
    """Each token runs through top_k routed experts (capacity slack not counted: recycle routing
    keeps the count at top_k)."""
    return shape.top_k_in_layer(layer) * 2 * expert_params(shape)


def layer_flops_per_token(shape: ModelShape, layer: int) -> float:
    return (attention_flops_per_token(shape, layer) + shared_expert_flops_per_token(shape)
            + router_flops_per_token(shape, layer) + routed_expert_flops_per_token(shape, layer))


def head_flops_per_token(shape: ModelShape) -> float:
    return 2 * shape.vocab_size * shape.hidden_size


def training_flops_multiplier(recompute: bool) -> int:
    """Forward 1×, backward 2× (input and weight gradients); full recomputation replays the forward."""
    return 4 if recompute else 3


# --- bytes -----------------------------------------------------------------------------------------

def activation_bytes_per_token(shape: ModelShape, layer: int, *, recompute: bool,
                               activation_bytes: int = 2) -> float:
    """Bytes one token's activations occupy between its forward and backward in `layer`.

    Without recomputation this counts what autograd keeps (after Korthikanti et al. 2022, with a
    fused attention kernel, so no seq_len² score matrix): norm inputs and outputs, Q (and K, V where
    the layer owns them), the attention output, softmax statistics, router logits, and for the shared
    expert and each of the top_k routed experts the input copy, gate/up outputs and activation.
    With full recomputation only the layer's input survives; the rest is rebuilt in backward.
    """
    a, h, d = activation_bytes, shape.hidden_size, shape.head_dim
    if recompute:
        return a * h
    attention = a * (2 * h + 2 * shape.num_heads * d) + 4 * shape.num_heads
    if shape.projects_kv(layer):
        attention += a * 2 * shape.num_kv_heads * d
    k = shape.top_k_in_layer(layer)
    moe = (a * 2 * h + 4 * shape.experts_in_layer(layer) + a * 3 * shape.shared_ffn_size
           + k * a * (h + 3 * shape.expert_ffn_size) + 4 * k)
    return attention + moe


def kv_bytes_per_token(shape: ModelShape, activation_bytes: int = 2) -> float:
    """K and V of one token, what a context-parallel ring passes between ranks."""
    return activation_bytes * 2 * shape.num_kv_heads * shape.head_dim


def optimizer_state_bytes(num_params: float, precision: Precision) -> float:
    """AdamW state for `num_params` parameters: fp32 master weights and two fp32 moments by default."""
    return num_params * precision.optimizer_bytes_per_param


def layer_heterogeneity(shape: ModelShape) -> float:
    """Most over least expensive layer in training FLOPs per token (1.0 for a uniform stack)."""
    flops = [layer_flops_per_token(shape, layer) for layer in range(shape.num_layers)]
    return max(flops) / min(flops)


@dataclass(frozen=True)
class LayerCosts:
    """The per-layer numbers the cost model reads, as read-only arrays indexed by layer. FLOPs are
    forward per token; multiply by `training_flops_multiplier` for a training step."""

    dense_flops_per_token: np.ndarray  # attention (incl. scores), shared expert, router
    score_flops_per_token: np.ndarray  # the part of the above that a CP ring can hide comms behind
    expert_flops_per_token: np.ndarray  # top_k routed experts
    dense_params: np.ndarray
    params_per_expert: int
    num_experts: np.ndarray
    top_k: np.ndarray
    activation_bytes_per_token: np.ndarray  # as stored for backward under the training's recompute
    full_activation_bytes_per_token: np.ndarray  # without recompute (one layer's working set)
    head_flops_per_token: float
    embedding_params: int
    head_params: int


def layer_costs(shape: ModelShape, *, recompute: bool, precision: Precision) -> LayerCosts:
    layers = range(shape.num_layers)

    def array(values) -> np.ndarray:
        out = np.array(list(values), dtype=np.float64)
        out.setflags(write=False)
        return out

    return LayerCosts(
        dense_flops_per_token=array(attention_flops_per_token(shape, i) + shared_expert_flops_per_token(shape)
                                    + router_flops_per_token(shape, i) for i in layers),
        score_flops_per_token=array(attention_score_flops_per_token(shape) for _ in layers),
        expert_flops_per_token=array(routed_expert_flops_per_token(shape, i) for i in layers),
        dense_params=array(dense_layer_params(shape, i) for i in layers),
        params_per_expert=expert_params(shape),
        num_experts=array(shape.experts_in_layer(i) for i in layers),
        top_k=array(shape.top_k_in_layer(i) for i in layers),
        activation_bytes_per_token=array(activation_bytes_per_token(
            shape, i, recompute=recompute, activation_bytes=precision.activation_bytes) for i in layers),
        full_activation_bytes_per_token=array(activation_bytes_per_token(
            shape, i, recompute=False, activation_bytes=precision.activation_bytes) for i in layers),
        head_flops_per_token=head_flops_per_token(shape),
        embedding_params=embedding_params(shape),
        head_params=head_params(shape),
    )


def _require_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
