"""The cards a job may use, grouped by node. A card's `global_id` is its name for the whole job: plans,
exclusions and calibration all refer to cards by it, and it never changes when other cards leave.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .cards import CardSpec, card_spec


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
        return tuple(dict.fromkeys(card.node for card in self.cards))

    def card(self, global_id: int) -> Card:
        for card in self.cards:
            if card.global_id == global_id:
                return card
        raise ValueError(f"no card with global id {global_id}; ids are {self._id_ranges()}")

    def cards_on_node(self, node: str) -> tuple[Card, ...]:
        found = tuple(card for card in self.cards if card.node == node)
        if not found:
            raise ValueError(f"no node {node!r}; nodes are {', '.join(self.node_names)}")
        return found

    def cards_by_node(self) -> dict[str, tuple[Card, ...]]:
        return {node: self.cards_on_node(node) for node in self.node_names}

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
