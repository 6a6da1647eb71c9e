"""Blocks and grids: how cards are grouped and laid out on the pipeline × data-parallel grid.

A block is the cp × tp cards that run one (stage, replica) cell in lockstep: always one card type on
one node, because a tensor-parallel group (and a context-parallel ring) runs at its slowest member and
over its slowest link. A grid is a (pp, dp) array of block indices: row s is pipeline stage s, column r
is data-parallel replica r.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .cards import effective_flops_per_s
from .cluster import Card, Cluster
from .cost import ACHIEVED_FLOPS_FRACTION


@dataclass(frozen=True)
class Block:
    card_ids: tuple[int, ...]  # index c * tp + t holds context rank c, tensor rank t
    node: str
    spec_name: str
    flops_per_s: float  # slowest member's sustained FLOP/s
    memory_bytes: int  # smallest member's memory
    memory_bandwidth_bytes_per_s: float
    intra_node_bandwidth_bytes_per_s: float
    inter_node_bandwidth_bytes_per_s: float
    collective_latency_s: float  # the largest member's


def card_flops_per_s(card: Card) -> float:
    return effective_flops_per_s(card.spec, ACHIEVED_FLOPS_FRACTION)


def make_block(cards: list[Card]) -> Block:
    specs = [card.spec for card in cards]
    return Block(
        card_ids=tuple(card.global_id for card in cards), node=cards[0].node,
        spec_name="+".join(dict.fromkeys(s.name for s in specs)),
        flops_per_s=min(card_flops_per_s(card) for card in cards),
        memory_bytes=min(s.memory_bytes for s in specs),
        memory_bandwidth_bytes_per_s=min(s.memory_bandwidth_bytes_per_s * s.speed for s in specs),
        intra_node_bandwidth_bytes_per_s=min(s.intra_node_bandwidth_bytes_per_s for s in specs),
        inter_node_bandwidth_bytes_per_s=min(s.inter_node_bandwidth_bytes_per_s for s in specs),
        collective_latency_s=max(s.collective_latency_s for s in specs))


def form_blocks(cluster: Cluster, block_size: int) -> list[Block]:
    """Blocks of `block_size` cards of one type on one node. Within a (node, type), cards are taken
    fastest first, so blocks pair cards of similar measured speed; leftovers stay unused."""
    blocks = []
    for node, cards in cluster.cards_by_node().items():
        by_type: dict[str, list[Card]] = {}
        for card in cards:
            by_type.setdefault(card.spec.name, []).append(card)
        for same in by_type.values():
            same.sort(key=lambda c: (-card_flops_per_s(c), -c.spec.memory_bytes, c.global_id))
            for start in range(0, len(same) - block_size + 1, block_size):
                blocks.append(make_block(same[start:start + block_size]))
    return blocks


def naive_blocks(cluster: Cluster, block_size: int) -> list[Block] | None:
    """Blocks of consecutive card ids, types ignored, as a homogeneous framework forms its TP groups.
    None when the cards do not divide evenly or a block would straddle two nodes."""
    cards = list(cluster.cards)
    if len(cards) % block_size:
        return None
    blocks = []
    for start in range(0, len(cards), block_size):
        group = cards[start:start + block_size]
        if len({card.node for card in group}) > 1:
            return None
        blocks.append(make_block(group))
    return blocks


@dataclass(frozen=True)
class BlockTable:
    """Blocks' numbers as arrays, so a whole grid is costed with numpy indexing."""

    blocks: tuple[Block, ...]
    flops_per_s: np.ndarray
    memory_bytes: np.ndarray
    memory_bandwidth: np.ndarray
    intra_bandwidth: np.ndarray
    inter_bandwidth: np.ndarray
    node_index: np.ndarray
    collective_latency: np.ndarray
    by_speed: np.ndarray  # block indices, fastest first, then more memory, then node, then first card
    by_memory: np.ndarray  # most memory first, then fastest, then node, then first card
    speed_rank: np.ndarray  # position of each block in by_speed

    @classmethod
    def of(cls, blocks: list[Block]) -> "BlockTable":
        nodes = {node: i for i, node in enumerate(dict.fromkeys(b.node for b in blocks))}
        flops = np.array([b.flops_per_s for b in blocks])
        memory = np.array([float(b.memory_bytes) for b in blocks])
        node_index = np.array([nodes[b.node] for b in blocks], dtype=np.int64)
        first_card = np.array([b.card_ids[0] for b in blocks], dtype=np.int64)
        # Equal blocks of one node stay adjacent in both orders, so rows and columns keep to nodes.
        by_speed = np.lexsort((first_card, node_index, -memory, -flops))
        by_memory = np.lexsort((first_card, node_index, -flops, -memory))
        speed_rank = np.empty(len(blocks), dtype=np.int64)
        speed_rank[by_speed] = np.arange(len(blocks))
        return cls(tuple(blocks), flops, memory,
                   np.array([b.memory_bandwidth_bytes_per_s for b in blocks]),
                   np.array([b.intra_node_bandwidth_bytes_per_s for b in blocks]),
                   np.array([b.inter_node_bandwidth_bytes_per_s for b in blocks]),
                   node_index, np.array([b.collective_latency_s for b in blocks]), by_speed, by_memory, speed_rank)


def speed_order(table: BlockTable, indices) -> list[int]:
    """`indices` fastest first (ties: more memory, then node, so equal blocks of a node stay adjacent)."""
    indices = np.asarray(indices, dtype=np.int64)
    return indices[np.argsort(table.speed_rank[indices], kind="stable")].tolist()


def block_selections(table: BlockTable, count: int) -> list[list[int]]:
    """Which `count` blocks to use when there are more: drop the slowest, or the smallest memory."""
    fastest = table.by_speed[:count].tolist()
    roomiest = speed_order(table, table.by_memory[:count])
    selections = [fastest]
    if sorted(roomiest) != sorted(fastest):
        selections.append(roomiest)
    return selections


# Up to this depth every order of the stages is tried (4! = 24); deeper pipelines try a few orders.
ALL_STAGE_ORDERS_UP_TO_PP = 4


def candidate_grids(table: BlockTable, chosen: list[int], pp: int, dp: int, *, thorough: bool = True
                    ) -> list[np.ndarray]:
    """Layouts of the chosen blocks (already in speed order) on the (pp, dp) grid:

    - by stage: stage rows of like blocks; layers then follow row speed;
    - by replica: replica columns of like blocks; micro-batches then follow column speed.

    Which stage goes first matters (early 1F1B stages hold more micro-batches; the first stage holds
    the embedding and the last the output layer). A quick pass (`thorough=False`) tries fastest-first
    only; a thorough one every stage order for short pipelines, and fastest-first, slowest-first and
    most-memory-first for deep ones.
    """
    ordered = np.array(chosen, dtype=np.int64)
    rows = ordered.reshape(pp, dp)
    columns = ordered.reshape(dp, pp).T
    row_memory = table.memory_bytes[rows].min(axis=1)
    memory_first = list(np.argsort(-row_memory, kind="stable"))
    if not thorough:
        orders = [list(range(pp))]
    elif pp <= ALL_STAGE_ORDERS_UP_TO_PP:
        orders = [list(order) for order in itertools.permutations(range(pp))]
    else:
        orders = [list(range(pp)), list(range(pp))[::-1], memory_first]
    column_memory_first = np.take_along_axis(
        columns, np.argsort(-table.memory_bytes[columns], axis=0, kind="stable"), axis=0)
    grids = [rows[order] for order in orders] + [columns[order] for order in orders]
    if thorough:
        grids.append(column_memory_first)
    unique: list[np.ndarray] = []
    seen = set()
    for grid in grids:
        key = grid.tobytes()
        if key not in seen:
            seen.add(key)
            unique.append(np.ascontiguousarray(grid))
    return unique
