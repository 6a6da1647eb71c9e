"""The MoE model's shape: one frozen dataclass, named presets, and the closed-form numbers the
planner and the tests read from it (parameter count, KV-cache size relative to multi-head attention).

Field names are a contract: the job file (`model: {preset: tiny, overrides: {...}}`) and the planner's
adapter use them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Hunyuan-Large-style MoE decoder.

    `num_experts` and `top_k` are an int (every layer alike) or a tuple with one entry per layer
    (a layered, heterogeneous MoE). `cla_share_every=n` groups layers by n: the first layer of a group
    projects K/V, the other n-1 reuse them (cross-layer attention); 1 means no sharing.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    expert_ffn_size: int
    shared_ffn_size: int
    num_experts: int | tuple[int, ...]
    top_k: int | tuple[int, ...]
    head_dim: int | None = None  # None: hidden_size // num_heads
    cla_share_every: int = 1
    rope_base: float = 10000.0
    max_seq_len: int = 2048
    capacity_factor: float = 1.25
    # Gate weights of a token's k experts: False = the raw softmax probabilities (Switch; with top-1
    # the task loss then trains the gate), True = renormalized to sum to 1 (Mixtral, and the
    # Hugging Face HunYuan MoE class, which an export must match).
    router_renormalize: bool = False
    aux_loss_coeff: float = 0.01
    recycle_seed: int = 0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # YAML gives lists; a frozen config must hold hashable, immutable tuples.
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "expert_ffn_size", "max_seq_len", "cla_share_every"):
            _require_positive_int(name, getattr(self, name))
        _require_non_negative_int("shared_ffn_size", self.shared_ffn_size)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(each KV head serves a whole group of query heads)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly or change one of them")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        _require_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of channels")
        self._check_per_layer("num_experts")
        self._check_per_layer("top_k")
        for layer in range(self.num_layers):
            if self.top_k_in_layer(layer) > self.experts_in_layer(layer):
                raise ValueError(
                    f"layer {layer}: top_k={self.top_k_in_layer(layer)} exceeds its "
                    f"num_experts={self.experts_in_layer(layer)}")
        if not isinstance(self.router_renormalize, bool):
            raise ValueError(f"router_renormalize={self.router_renormalize!r} must be true or false")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 "
                             "(1.0 = exactly enough slots for every token; 1.25 is usual)")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base={self.rope_base} must be > 1 (10000 is usual)")
        if self.aux_loss_coeff < 0:
            raise ValueError(f"aux_loss_coeff={self.aux_loss_coeff} must be >= 0")

    def _check_per_layer(self, name: str) -> None:
        value = getattr(self, name)
        values = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and len(value) != self.num_layers:
            raise ValueError(
                f"{name} has {len(value)} entries but num_layers={self.num_layers}; "
                "give one int for all layers or exactly one per layer")
        for entry in values:
            _require_positive_int(name, entry)

    # --- per-layer shape -------------------------------------------------------------------------

    def experts_in_layer(self, layer: int) -> int:
        """Routed experts in `layer` (0-based)."""
        return _per_layer(self.num_experts, layer, self.num_layers)

    def top_k_in_layer(self, layer: int) -> int:
        """Routed experts each token is sent to in `layer`."""
        return _per_layer(self.top_k, layer, self.num_layers)

    def is_kv_consumer(self, layer: int) -> bool:
        """True when `layer` projects no K/V of its own and reuses the last producer's."""
        _check_layer(layer, self.num_layers)
        return layer % self.cla_share_every != 0

    def kv_producer_of(self, layer: int) -> int:
        """The layer whose K/V `layer` attends with (itself for a producer)."""
        _check_layer(layer, self.num_layers)
        return layer - layer % self.cla_share_every

    def capacity_per_expert(self, layer: int, num_tokens: int) -> int:
        """Slots per routed expert for a batch of `num_tokens`: ceil(cf × tokens × k / N)."""
        k, experts = self.top_k_in_layer(layer), self.experts_in_layer(layer)
        return math.ceil(self.capacity_factor * num_tokens * k / experts)

    # --- closed-form sizes ------------------------------------------------------------------------

    def attention_param_count(self, layer: int) -> int:
        h, d = self.hidden_size, self.head_dim
        count = 2 * h * self.num_heads * d  # q_proj and o_proj
        if self.qk_norm:
            count += d  # q_norm
        if not self.is_kv_consumer(layer):
            count += 2 * h * self.num_kv_heads * d  # k_proj and v_proj
            if self.qk_norm:
                count += d  # k_norm
        return count

    def moe_param_count(self, layer: int) -> int:
        h, experts = self.hidden_size, self.experts_in_layer(layer)
        shared = 3 * h * self.shared_ffn_size  # SwiGLU: gate, up, down
        routed = experts * 3 * h * self.expert_ffn_size
        router = h * experts
        return shared + routed + router

    def layer_param_count(self, layer: int) -> int:
        norms = 2 * self.hidden_size  # before attention and before the MoE
        return norms + self.attention_param_count(layer) + self.moe_param_count(layer)

    def param_count(self) -> int:
        """Total parameters, by formula (equals the built model's count)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        layers = sum(self.layer_param_count(i) for i in range(self.num_layers))
        return embeddings + layers + self.hidden_size  # + final norm

    def active_param_count(self) -> int:
        """Parameters one token passes through: the shared expert plus its top-k routed experts."""
        inactive = 0
        for layer in range(self.num_layers):
            unused = self.experts_in_layer(layer) - self.top_k_in_layer(layer)
            inactive += unused * 3 * self.hidden_size * self.expert_ffn_size
        return self.param_count() - inactive

    def kv_cache_ratio_vs_mha(self) -> float:
        """KV-cache size relative to multi-head attention with the same heads and layers.

        MHA caches K and V for every query head in every layer; GQA caches num_kv_heads of them, and
        CLA caches them only in producer layers. Hunyuan-Large: 8/80 × 32/64 = 5% (before any
        quantization of the cache).
        """
        producers = sum(1 for i in range(self.num_layers) if not self.is_kv_consumer(i))
        return (self.num_kv_heads * producers) / (self.num_heads * self.num_layers)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The named preset with `overrides` applied (field name → value)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s) {', '.join(map(repr, unknown))} in overrides for preset "
                f"{name!r}; valid fields: {', '.join(sorted(fields))}")
        values = dict(_PRESETS[name])
        values.update(overrides)
        if "num_heads" in overrides and "head_dim" not in overrides:
            values.pop("head_dim", None)  # re-derive it from the new head count
        return cls(**values)


def _per_layer(value: int | tuple[int, ...], layer: int, num_layers: int) -> int:
    _check_layer(layer, num_layers)
    return value[layer] if isinstance(value, tuple) else value


def _check_layer(layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer index {layer} out of range for num_layers={num_layers}")


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _require_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (0 = no shared expert)")


_PRESETS: dict[str, dict[str, Any]] = {
    # Runs in milliseconds; layers differ in top-k and use CLA so tests exercise both.
    "tiny": dict(
        vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        expert_ffn_size=64, shared_ffn_size=128, num_experts=8, top_k=(1, 2, 1, 2),
        cla_share_every=2, max_seq_len=128,
    ),
    # A CPU demo: about 6.4M parameters.
    "small": dict(
        vocab_size=2048, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2,
        expert_ffn_size=256, shared_ffn_size=256, num_experts=8, top_k=1,
        cla_share_every=2, max_seq_len=512,
    ),
    # Tencent Hunyuan-Large (arXiv 2411.02265, Table 1): 389B total, 52B active. Head dim is
    # 6400 / 80 = 80; embeddings are untied. For cost estimates only: never built in full on a CPU.
    "hunyuan-large": dict(
        vocab_size=128512, hidden_size=6400, num_layers=64, num_heads=80, num_kv_heads=8,
        expert_ffn_size=18304, shared_ffn_size=18304, num_experts=16, top_k=1,
        cla_share_every=2, max_seq_len=4096,
    ),
}
