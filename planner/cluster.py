"""The cards a job may use, grouped by node. A card's `global_id` is its name for the whole job: plans,
exclusions and calibration all refer to cards by it, and it never changes when other cards leave.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .cards import GB_PER_S, GIB, CardSpec, card_spec


@dataclass(frozen=True)
class Card:
    global_id: int
    node: str
    local_index: int  # index on its node (CUDA_VISIBLE_DEVICES order, or a simulated card's index)
    spec: CardSpec


@dataclass(frozen=True)
class Cluster:
    """Cards in global-id order. Build with `Cluster.from_nodes` unless ids must be chosen."""

    cards: tuple[Card, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "cards", tuple(sorted(self.cards, key=lambda card: card.global_id)))
        ids = [card.global_id for card in self.cards]
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        if repeated:
            raise ValueError(f"card global ids must be unique; repeated: {repeated}")
        places = Counter((card.node, card.local_index) for card in self.cards)
        clashes = sorted(place for place, n in places.items() if n > 1)
        if clashes:
            raise ValueError(f"two cards claim the same (node, local index): {clashes}")

    @classmethod
    def from_nodes(cls, nodes: Mapping[str, Sequence[CardSpec | str]], *,
                   custom: Mapping[str, CardSpec] | None = None) -> "Cluster":
        """`{"node0": ["H100-SXM"] * 8, "node1": [spec, spec]}` → cards numbered 0, 1, ... in order."""
        cards = []
        for node, specs in nodes.items():
            for local_index, spec in enumerate(specs):
                if isinstance(spec, str):
                    spec = card_spec(spec, custom=custom)
                cards.append(Card(len(cards), node, local_index, spec))
        if not cards:
            raise ValueError("a cluster needs at least one card; every node listed is empty")
        return cls(tuple(cards))

    def __len__(self) -> int:
        return len(self.cards)

    @property
    def card_ids(self) -> tuple[int, ...]:
        return tuple(card.global_id for card in self.cards)

    @property
    def node_names(self) -> tuple[str, ...]:
        """Nodes in the order their first card appears."""
        return tuple(self._by_node)

    @functools.cached_property
    def _by_id(self) -> dict[int, Card]:
        return {card.global_id: card for card in self.cards}

    @functools.cached_property
    def _by_node(self) -> dict[str, tuple[Card, ...]]:
        groups: dict[str, list[Card]] = {}
        for card in self.cards:
            groups.setdefault(card.node, []).append(card)
        return {node: tuple(cards) for node, cards in groups.items()}

    def card(self, global_id: int) -> Card:
        try:
            return self._by_id[global_id]
        except KeyError:
            raise ValueError(f"no card with global id {global_id}; ids are {self._id_ranges()}") from None

    def cards_on_node(self, node: str) -> tuple[Card, ...]:
        if node not in self._by_node:
            raise ValueError(f"no node {node!r}; nodes are {', '.join(self.node_names)}")
        return self._by_node[node]

    def cards_by_node(self) -> dict[str, tuple[Card, ...]]:
        """Node → its cards, nodes in the order their first card appears."""
        return dict(self._by_node)

    def cards_by_type(self) -> dict[str, tuple[Card, ...]]:
        """Card type name → its cards, types in order of first appearance."""
        groups: dict[str, list[Card]] = {}
        for card in self.cards:
            groups.setdefault(card.spec.name, []).append(card)
        return {name: tuple(cards) for name, cards in groups.items()}

    def without(self, excluded: Iterable[int]) -> "Cluster":
        """The cluster less the cards in `excluded` (global ids); the others keep their ids."""
        excluded = frozenset(excluded)
        unknown = sorted(excluded - set(self.card_ids))
        if unknown:
            raise ValueError(f"cannot exclude unknown card ids {unknown}; ids are {self._id_ranges()}")
        kept = tuple(card for card in self.cards if card.global_id not in excluded)
        if not kept:
            raise ValueError(f"excluding {len(excluded)} card(s) leaves no card to train on")
        return Cluster(kept)

    def with_specs(self, specs_by_card: Mapping[int, CardSpec]) -> "Cluster":
        """The cluster with some cards' specs replaced (calibration uses this)."""
        unknown = sorted(set(specs_by_card) - set(self.card_ids))
        if unknown:
            raise ValueError(f"unknown card ids {unknown}; ids are {self._id_ranges()}")
        return Cluster(tuple(dataclasses.replace(card, spec=specs_by_card.get(card.global_id, card.spec))
                             for card in self.cards))

    def describe(self) -> str:
        """'8 × H100-SXM + 8 × A100-80GB on 2 nodes'."""
        counts = Counter(card.spec.name for card in self.cards)
        kinds = " + ".join(f"{n} × {name}" for name, n in counts.items())
        nodes = len(self.node_names)
        return f"{kinds} on {nodes} node{'s' if nodes != 1 else ''}"

    def _id_ranges(self) -> str:
        ids = self.card_ids
        return f"{ids[0]}..{ids[-1]} ({len(ids)} cards)" if ids else "(none)"


def cluster_from_job(nodes: Sequence[Any], card_types: Mapping[str, Any] | None = None) -> Cluster:
    """The job file's `cluster` section as the planner sees it, from plain data or the job's own
    models (read by field name, so the planner needs nothing from the runtime):

    nodes: [{"name": "node0", "cards": [{"type": "H100-SXM", "count": 8, "memory_gb": None, "speed": 1.0}]}]
    card_types: {"X1": {"peak_tflops": 100, "memory_gb": 24, "memory_bandwidth_gbps": 1000,
                        "intra_node_bandwidth_gbps": 100, "inter_node_bandwidth_gbps": 12.5}}

    memory_gb counts GiB (as the agent reads it); bandwidths are GB/s.
    """
    custom = {name: CardSpec(name, float(_field(t, "peak_tflops")), int(float(_field(t, "memory_gb")) * GIB),
                             float(_field(t, "memory_bandwidth_gbps", 1000.0)) * GB_PER_S,
                             float(_field(t, "intra_node_bandwidth_gbps", 100.0)) * GB_PER_S,
                             float(_field(t, "inter_node_bandwidth_gbps", 12.5)) * GB_PER_S)
              for name, t in (card_types or {}).items()}
    by_node: dict[str, list[CardSpec]] = {}
    for node in nodes:
        specs = by_node.setdefault(str(_field(node, "name")), [])
        for group in _field(node, "cards"):
            memory_gb = _field(group, "memory_gb")
            spec = card_spec(str(_field(group, "type", "cpu-sim")), custom=custom,
                             speed=float(_field(group, "speed", 1.0)),
                             memory_bytes=None if memory_gb is None else int(float(memory_gb) * GIB))
            specs.extend([spec] * int(_field(group, "count", 1)))
    return Cluster.from_nodes(by_node)


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)
