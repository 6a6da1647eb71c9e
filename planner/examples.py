"""Example models, training settings and clusters, shared by the tests, the benchmarks and the docs so
they all talk about the same shapes."""

from __future__ import annotations

import random

from .cards import card_spec
from .cluster import Cluster
from .model_cost import ModelShape
from .training import TrainingConfig

# Types the random clusters draw from: a spread of speeds (148 to 989 TFLOP/s) and memories (32-96 GiB).
MIXED_TYPES = ("H100-SXM", "A100-80GB", "A100-40GB", "L40S", "H20", "V100-32GB")


def tiny_shape() -> ModelShape:
    """The runtime's `tiny` preset (4 layers, 8 experts, per-layer top-k) at 64 tokens per sequence."""
    return ModelShape(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                      expert_ffn_size=64, shared_ffn_size=128, num_experts=8, top_k=(1, 2, 1, 2),
                      cla_share_every=2, seq_len=64)


def small_moe_shape(num_layers: int = 8) -> ModelShape:
    """A ~2B-parameter MoE (DeepSeek-MoE-like proportions), big enough that real cards' memory and
    links matter, small enough that every layout of an 8-card cluster fits somewhere."""
    return ModelShape(vocab_size=32000, hidden_size=2048, num_layers=num_layers, num_heads=16, num_kv_heads=4,
                      head_dim=128, expert_ffn_size=1408, shared_ffn_size=2816, num_experts=8, top_k=2,
                      cla_share_every=2, seq_len=4096)


def mixtral_shape(seq_len: int = 4096) -> ModelShape:
    """Mixtral-8x7B's proportions (47B parameters, 13B active), no shared expert."""
    return ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, expert_ffn_size=14336, shared_ffn_size=0, num_experts=8, top_k=2,
                      cla_share_every=1, seq_len=seq_len)


def hunyuan_large_shape(seq_len: int = 4096) -> ModelShape:
    """Tencent Hunyuan-Large (arXiv 2411.02265): 389B parameters, 52B active."""
    return ModelShape(vocab_size=128512, hidden_size=6400, num_layers=64, num_heads=80, num_kv_heads=8,
                      head_dim=80, expert_ffn_size=18304, shared_ffn_size=18304, num_experts=16, top_k=1,
                      cla_share_every=2, seq_len=seq_len)


def small_training(sequences: int = 64) -> TrainingConfig:
    return TrainingConfig(micro_batch_size=1, global_batch_sequences=sequences)


def random_small_cluster(rng: random.Random, *, max_cards: int = 8, max_nodes: int = 3,
                         types: tuple[str, ...] = MIXED_TYPES, mixed_nodes: bool = False) -> Cluster:
    """2 to `max_nodes` nodes of 1, 2 or 4 cards, at most `max_cards` in all, at least two types. Each
    node holds one card type (as real servers do) unless `mixed_nodes`, where a node may hold two."""
    while True:
        nodes: dict[str, list[str]] = {}
        total = 0
        for index in range(rng.randint(2, max_nodes)):
            count = min(rng.choice((1, 2, 4)), max_cards - total)
            if count == 0:
                break
            kinds = rng.sample(types, 2 if mixed_nodes and count > 1 else 1)
            nodes[f"node{index}"] = sorted(rng.choice(kinds) for _ in range(count))
            total += count
        if len({kind for kinds in nodes.values() for kind in kinds}) >= 2:
            return Cluster.from_nodes(nodes)


def large_cluster(num_cards: int, types: tuple[str, ...] = ("H100-SXM", "A100-80GB", "H20", "L40S"),
                  cards_per_node: int = 8) -> Cluster:
    """`num_cards` cards on nodes of 8, the types taking equal shares of the nodes in turn."""
    if num_cards % cards_per_node:
        raise ValueError(f"num_cards={num_cards} must be a multiple of cards_per_node={cards_per_node}")
    nodes = {f"node{i:05d}": [card_spec(types[i % len(types)])] * cards_per_node
             for i in range(num_cards // cards_per_node)}
    return Cluster.from_nodes(nodes)
