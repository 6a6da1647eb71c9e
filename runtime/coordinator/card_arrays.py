"""Per-card state of the whole fleet as flat numpy arrays, indexed by card slot (a node owns a
contiguous range of slots). Heartbeats are written in batches (one relay batch: a few vector
assignments), not as a Python object per sample, so 10,000 nodes × 8 cards at 1 Hz stay cheap; the
metrics scrape and the liveness check read the same arrays. Torch-free; no locks of its own (its
owner, the card collector, holds one around writes and snapshots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_FLOAT_COLUMNS = ("temperature_c", "slowdown_c", "power_w", "utilization")
_INT_COLUMNS = ("memory_used_bytes", "ecc_uncorrected", "throttle_mask")


@dataclass(frozen=True)
class CardColumns:
    """One batch of card samples, nodes' cards concatenated in order (what a RelayBatch carries)."""

    card_index: np.ndarray      # uint32, per card
    temperature_c: np.ndarray
    slowdown_c: np.ndarray
    power_w: np.ndarray
    utilization: np.ndarray
    memory_used_bytes: np.ndarray
    ecc_uncorrected: np.ndarray
    throttle_mask: np.ndarray

    @classmethod
    def from_samples(cls, samples) -> CardColumns:
        """CardTelemetry messages (proto/hyrun.proto) of one node, as columns."""
        rows = [(s.index, s.temperature_c, s.slowdown_temperature_c, s.power_w, s.utilization,
                 s.memory_used_bytes, s.ecc_uncorrected, s.throttle_reasons) for s in samples]  # fmt: skip
        cols = list(zip(*rows)) if rows else [()] * 8
        return cls(np.asarray(cols[0], np.int64), *(np.asarray(c, np.float64) for c in cols[1:5]),
                   *(np.asarray(c, np.int64) for c in cols[5:]))  # fmt: skip


class CardArrays:
    """Slots grow by doubling; a node that reports more cards than its range holds moves to a new
    range (the old one is freed: its slots stop being `present`)."""

    def __init__(self, capacity_cards: int = 1024, capacity_nodes: int = 256) -> None:
        self.node_index: dict[str, int] = {}       # node name -> node id
        self.node_names: list[str] = []
        self.type_names: list[str] = ["unknown"]   # card type id -> name
        self._type_ids: dict[str, int] = {"unknown": 0}
        self.used_slots = 0
        self._alloc_cards(capacity_cards)
        self._alloc_nodes(capacity_nodes)

    # ---- storage ---------------------------------------------------------------------------

    def _alloc_cards(self, n: int) -> None:
        old = {k: getattr(self, k) for k in self._card_fields()} if hasattr(self, "present") else {}
        self.present = np.zeros(n, bool)               # slot holds a registered or reporting card
        self.slot_node = np.full(n, -1, np.int64)      # node id of the slot
        self.card_index = np.zeros(n, np.int64)
        self.card_type = np.zeros(n, np.int64)         # into type_names
        self.memory_total_bytes = np.zeros(n, np.int64)
        for name in _FLOAT_COLUMNS:
            setattr(self, name, np.full(n, math.nan if name in ("temperature_c", "slowdown_c") else 0.0))
        for name in _INT_COLUMNS:
            setattr(self, name, np.zeros(n, np.int64))
        self.seen_s = np.full(n, math.nan)             # when the card's newest sample arrived
        for k, v in old.items():
            getattr(self, k)[: len(v)] = v

    def _card_fields(self) -> tuple[str, ...]:
        return ("present", "slot_node", "card_index", "card_type", "memory_total_bytes", *_FLOAT_COLUMNS,
                *_INT_COLUMNS, "seen_s")  # fmt: skip

    def _alloc_nodes(self, n: int) -> None:
        old = {k: getattr(self, k) for k in self._node_fields()} if hasattr(self, "slot_start") else {}
        self.slot_start = np.zeros(n, np.int64)
        self.slot_count = np.zeros(n, np.int64)
        self.last_seen_s = np.full(n, math.nan)        # newest beat (monotonic clock)
        self.lease_from_s = np.full(n, math.nan)       # silence is counted from here (a relay's death moves it)
        self.sequence = np.zeros(n, np.int64)          # newest heartbeat sequence
        self.beats = np.zeros(n, np.int64)             # heartbeats taken
        self.missed = np.zeros(n, np.int64)            # gaps in the sequence: beats that never arrived
        for k, v in old.items():
            getattr(self, k)[: len(v)] = v

    def _node_fields(self) -> tuple[str, ...]:
        return ("slot_start", "slot_count", "last_seen_s", "lease_from_s", "sequence", "beats", "missed")

    def node_id(self, node: str, cards: int = 0) -> int:
        """The node's id, its slot range holding at least `cards` cards."""
        nid = self.node_index.get(node)
        if nid is None:
            nid = self.node_index[node] = len(self.node_names)
            self.node_names.append(node)
            if nid >= len(self.slot_start):
                self._alloc_nodes(2 * len(self.slot_start))
        if cards > self.slot_count[nid]:
            self._move(nid, cards)
        return nid

    def _move(self, nid: int, cards: int) -> None:
        start, count = int(self.slot_start[nid]), int(self.slot_count[nid])
        while self.used_slots + cards > len(self.present):
            self._alloc_cards(2 * len(self.present))
        new = self.used_slots
        for name in self._card_fields():
            column = getattr(self, name)
            column[new : new + count] = column[start : start + count]
        if count:
            self.present[start : start + count] = False
            self.slot_node[start : start + count] = -1
        self.slot_node[new : new + cards] = nid
        self.card_index[new : new + cards] = np.arange(cards)
        self.slot_start[nid], self.slot_count[nid] = new, cards
        self.used_slots += cards

    def type_id(self, card_type: str) -> int:
        tid = self._type_ids.get(card_type)
        if tid is None:
            tid = self._type_ids[card_type] = len(self.type_names)
            self.type_names.append(card_type)
        return tid

    # ---- writes (the coordinator's loop) -----------------------------------------------------

    def register(self, node: str, cards: list[tuple[int, str, int]], now_s: float | None = None) -> None:
        """(index, card type, memory bytes) of each card of a registering node. A node registering
        again starts a fresh lease (`now_s`), or the silence before would mark it lost at once."""
        nid = self.node_id(node, max((i for i, _, _ in cards), default=-1) + 1)
        if now_s is not None and not self.lease_from_s[nid] >= now_s:
            self.lease_from_s[nid] = now_s
        start = int(self.slot_start[nid])
        for index, card_type, memory_bytes in cards:
            slot = start + index
            self.present[slot] = True
            self.card_type[slot] = self.type_id(card_type or "unknown")
            self.memory_total_bytes[slot] = memory_bytes

    def ingest(self, nodes: list[str], sequences, card_counts, columns: CardColumns, now_s: float) -> np.ndarray:
        """One batch: `card_counts[i]` cards of node `nodes[i]`, in `columns`. Returns the node ids."""
        counts = np.asarray(card_counts, np.int64)
        if len(nodes) == 0:
            return np.zeros(0, np.int64)
        top = _per_node_max(columns.card_index, counts) + 1
        index = self.node_index
        nids = np.fromiter((index.get(n, -1) for n in nodes), np.int64, len(nodes))
        for k in np.flatnonzero((nids < 0) | (self.slot_count[nids] < top)):  # new nodes, more cards: rare
            nids[k] = self.node_id(nodes[k], int(top[k]))
        slots = np.repeat(self.slot_start[nids], counts) + columns.card_index
        for name in _FLOAT_COLUMNS + _INT_COLUMNS:
            getattr(self, name)[slots] = getattr(columns, name)
        self.present[slots] = True
        self.seen_s[slots] = now_s
        self._beat(nids, np.asarray(sequences, np.int64), now_s)
        return nids

    def ingest_node(self, node: str, sequence: int, samples, now_s: float) -> None:
        """One node's CardTelemetry messages (a heartbeat on its own Connect stream). Element writes:
        for 8 cards they cost less than the ~30 vector calls of `ingest`."""
        top = max((s.index for s in samples), default=-1) + 1
        nid = self.node_index.get(node)
        if nid is None or self.slot_count[nid] < top:
            nid = self.node_id(node, top)
        start = int(self.slot_start[nid])
        temp, slow, power, util = self.temperature_c, self.slowdown_c, self.power_w, self.utilization
        mem, ecc, thr, present, seen = self.memory_used_bytes, self.ecc_uncorrected, self.throttle_mask, self.present, self.seen_s
        for s in samples:
            k = start + s.index
            temp[k], slow[k], power[k], util[k] = s.temperature_c, s.slowdown_temperature_c, s.power_w, s.utilization
            mem[k], ecc[k], thr[k], present[k], seen[k] = s.memory_used_bytes, s.ecc_uncorrected, s.throttle_reasons, True, now_s
        previous = int(self.sequence[nid])
        if previous > 0 and sequence > previous + 1:
            self.missed[nid] += sequence - previous - 1
        self.sequence[nid] = max(previous, sequence)
        self.beats[nid] += 1
        self.last_seen_s[nid] = now_s
        self.lease_from_s[nid] = max(now_s, self.lease_from_s[nid]) if not math.isnan(self.lease_from_s[nid]) else now_s

    def _beat(self, nids: np.ndarray, sequences: np.ndarray, now_s: float) -> None:
        previous = self.sequence[nids]
        known = previous > 0
        self.missed[nids] += np.where(known, np.maximum(sequences - previous - 1, 0), 0)
        self.sequence[nids] = np.maximum(previous, sequences)
        self.beats[nids] += 1
        self.last_seen_s[nids] = now_s
        self.lease_from_s[nids] = np.fmax(self.lease_from_s[nids], now_s)

    def extend_lease(self, nodes, now_s: float) -> None:
        """Silence of these nodes counts from `now_s` (their relay died: not their fault)."""
        nids = [self.node_index[n] for n in nodes if n in self.node_index]
        self.lease_from_s[nids] = np.fmax(self.lease_from_s[nids], now_s)

    # ---- reads -----------------------------------------------------------------------------

    def overdue(self, now_s: float, lease_s: float, watched: np.ndarray | None = None) -> list[str]:
        """Nodes (of `watched` node ids, default all) silent for longer than `lease_s`."""
        n = len(self.node_names)
        lease_from = self.lease_from_s[:n]
        late = np.flatnonzero(now_s - lease_from > lease_s)  # NaN (never seen) compares False
        if watched is not None:
            late = np.intersect1d(late, watched)
        return [self.node_names[i] for i in late]

    def slots_in_use(self) -> np.ndarray:
        return np.flatnonzero(self.present[: self.used_slots])


def _per_node_max(card_index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Highest card index of each node's run in `card_index` (-1 for a node with no cards)."""
    out = np.full(len(counts), -1, np.int64)
    has = counts > 0
    if has.any():
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[has]
        out[has] = np.maximum.reduceat(np.asarray(card_index, np.int64), starts)
    return out


class DelayHistogram:
    """Send-to-stored delays, in log-spaced buckets from 10 µs to 100 s: p50/p99 without keeping
    every sample (10,000 beats a second)."""

    _EDGES = np.logspace(-5, 2, 701)  # 1 % wide buckets

    def __init__(self) -> None:
        self.counts = np.zeros(len(self._EDGES) + 1, np.int64)

    def add(self, delays_s: np.ndarray) -> None:
        self.counts += np.bincount(np.searchsorted(self._EDGES, delays_s), minlength=len(self.counts))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        total = self.total
        if total == 0:
            return math.nan
        bucket = int(np.searchsorted(np.cumsum(self.counts), q * total))
        return float(self._EDGES[min(bucket, len(self._EDGES) - 1)])  # the bucket's upper edge
