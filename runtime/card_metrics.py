"""Per-card Prometheus series, built at scrape time from the newest heartbeat sample of each card.

Samples land in flat per-card arrays (coordinator/card_arrays.py: one vector write per relay batch,
under a lock shared with the scrape thread, which copies the columns); the families are made when
Prometheus asks, and rows only for the cards exported. Cardinality is bounded: at most `limit` cards
are exported one series each, chosen by `cards_to_export` (`riskiest_slots` over the arrays):
quarantined cards and cards with XID, ECC or throttle events (the slowed ones) first, then the
hottest by temperature margin; every card, exported or not, is counted in per-type histograms of
temperature margin and utilization, so a 10,000-node fleet costs `limit` × (about ten) series plus
a few per card type, not 80,000 × ten.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily

from hyrun.runtime.coordinator.card_arrays import CardArrays, CardColumns

# Default bound on cards exported as their own series (DESIGN: Monitoring, Scale). A node has 8 cards,
# so 512 cards is 64 nodes in full detail; beyond that, the riskiest 512 and the fleet histograms.
# (prometheus_client formats ~20k series/s on a busy core, and the scrape shares the GIL with ingest.)
CARD_SERIES_LIMIT = 512

# NVML clocks-event reasons (nvmlClocksEventReason*), by bit. "gpu_idle" and "applications_clocks"
# are not trouble, but they are what NVML says, so they are exported too (dashboards filter them).
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
    0x100: "display_clocks",
}  # fmt: skip
_TROUBLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # reasons that slow a card down for its own sake
MARGIN_BUCKETS_C = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)
UTILIZATION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

_LABELS = ["node", "card", "card_type"]


def throttle_reasons(mask: int) -> list[str]:
    """NVML's bit mask as reason names (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    return names + ([f"0x{unknown:x}"] if unknown else [])


@dataclass(slots=True)
class CardRow:
    """What the coordinator last heard about one card (the collector replaces it, never changes it)."""

    node: str
    card: int
    card_type: str = "unknown"
    memory_total_bytes: int = 0
    temperature_c: float = math.nan
    slowdown_c: float = math.nan
    power_w: float = 0.0
    utilization: float = 0.0
    memory_used_bytes: int = 0
    ecc_uncorrected: int = 0
    throttle_mask: int = 0
    xid_counts: dict[int, int] = field(default_factory=dict)  # XID code -> events since the coordinator started
    quarantined: bool = False

    @property
    def margin_c(self) -> float:
        return self.slowdown_c - self.temperature_c if self.slowdown_c > 0 else math.inf

    @property
    def troubled(self) -> bool:
        return self.quarantined or bool(self.xid_counts) or self.ecc_uncorrected > 0 or bool(self.throttle_mask & _TROUBLE_MASK)


def cards_to_export(rows: list[CardRow], limit: int) -> list[CardRow]:
    """The cards that get series of their own: all of them up to `limit`; beyond it, troubled cards
    first, then the hottest relative to their threshold. Pure, so the choice is tested directly."""
    if len(rows) <= limit:
        return rows
    return heapq.nsmallest(limit, rows, key=_risk)


def _risk(row: CardRow) -> tuple:
    margin = row.margin_c
    return (not row.troubled, margin if not math.isnan(margin) else math.inf, row.node, row.card)


class CardCollector:
    """A prometheus_client collector (registered on the coordinator's registry). Card state lives in
    `arrays` (coordinator/card_arrays.py), written in batches; rows are made only for exported cards."""

    def __init__(self, limit: int = CARD_SERIES_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()  # writes (the loop) against snapshots (the scrape thread)
        self.arrays = CardArrays()
        self._xids: dict[tuple[str, int], dict[int, int]] = {}  # XID code -> events since the coordinator started
        self._quarantined: frozenset[tuple[str, int]] = frozenset()
        self.fatal_xids: frozenset[int] = frozenset()  # the running job's (HealthSection.fatal_xids)

    # ---- the coordinator's loop --------------------------------------------------------------

    def register_node(self, node: str, cards: list[tuple[int, str, int]], now_s: float | None = None) -> None:
        """A node registered: (index, card type, memory bytes) of each card; `now_s`: when (its lease starts)."""
        with self._lock:
            self.arrays.register(node, cards, now_s)

    def ingest(self, node: str, samples, now_s: float | None = None, sequence: int = 0) -> None:
        """A heartbeat's CardTelemetry messages (proto/hyrun.proto)."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            self.arrays.ingest_node(node, sequence, samples, now_s)
            for s in samples:
                if s.xid_events:
                    self._count_xids(node, s.index, s.xid_events)

    def ingest_batch(self, nodes, sequences, card_counts, columns: CardColumns, xids, now_s: float):
        """A relay's batch; `xids`: (node, card, codes) of the few cards that had XID events. Returns node ids."""
        with self._lock:
            nids = self.arrays.ingest(nodes, sequences, card_counts, columns, now_s)
            for node, card, codes in xids:
                self._count_xids(node, card, codes)
        return nids

    def _count_xids(self, node: str, card: int, codes) -> None:
        counts = dict(self._xids.get((node, card), {}))  # copied on write: a scrape reads it unlocked
        for xid in codes:
            counts[xid] = counts.get(xid, 0) + 1
        self._xids[(node, card)] = counts

    def set_quarantined(self, cards: frozenset[tuple[str, int]]) -> None:
        self._quarantined = cards  # one reference swap: the scrape thread sees the old or the new set

    # ---- the scrape thread -------------------------------------------------------------------

    def _snapshot(self) -> tuple[dict, list[str], list[str]]:
        """Copies of the present cards' columns (a few vector copies under the lock)."""
        a = self.arrays
        with self._lock:
            slots = a.slots_in_use()
            cols = {name: getattr(a, name)[slots] for name in (
                "slot_node", "card_index", "card_type", "memory_total_bytes", "temperature_c", "slowdown_c",
                "power_w", "utilization", "memory_used_bytes", "ecc_uncorrected", "throttle_mask", "seen_s")}  # fmt: skip
            names, types = list(a.node_names), list(a.type_names)
        quarantined, xids = self._quarantined, self._xids
        cols["quarantined"] = np.fromiter(((names[n], int(c)) in quarantined for n, c in zip(cols["slot_node"], cols["card_index"])),
                                          bool, len(slots)) if quarantined else np.zeros(len(slots), bool)  # fmt: skip
        cols["has_xid"] = np.fromiter(((names[n], int(c)) in xids for n, c in zip(cols["slot_node"], cols["card_index"])),
                                      bool, len(slots)) if xids else np.zeros(len(slots), bool)  # fmt: skip
        return cols, names, types

    def _rows(self, cols: dict, picked: np.ndarray, names: list[str], types: list[str]) -> list[CardRow]:
        xids = self._xids
        rows = []
        for i in picked:
            node, card = names[cols["slot_node"][i]], int(cols["card_index"][i])
            rows.append(CardRow(
                node, card, types[cols["card_type"][i]], int(cols["memory_total_bytes"][i]), float(cols["temperature_c"][i]),
                float(cols["slowdown_c"][i]), float(cols["power_w"][i]), float(cols["utilization"][i]),
                int(cols["memory_used_bytes"][i]), int(cols["ecc_uncorrected"][i]), int(cols["throttle_mask"][i]),
                xids.get((node, card), {}), bool(cols["quarantined"][i]),
            ))  # fmt: skip
        return rows

    def describe(self):
        return list(self._families(0, [], _fleet_histograms(_EMPTY, [])))

    def collect(self):
        cols, names, types = self._snapshot()
        exported = self._rows(cols, riskiest_slots(cols, self.limit), names, types)
        return list(self._families(len(cols["card_index"]), exported, _fleet_histograms(cols, types)))

    def _families(self, cards: int, exported: list[CardRow], histograms):
        def gauge(name, doc, value_of, extra=None):
            family = GaugeMetricFamily(name, doc, labels=_LABELS + ([extra] if extra else []))
            for row in exported:
                value = value_of(row)
                if value is not None:
                    family.add_metric([row.node, str(row.card), row.card_type], value)
            return family

        yield gauge("hyrun_card_temperature_celsius", "Card temperature", lambda r: r.temperature_c)
        yield gauge("hyrun_card_slowdown_temperature_celsius", "Temperature at which the card slows itself down",
                    lambda r: r.slowdown_c if r.slowdown_c > 0 else None)
        yield gauge("hyrun_card_power_watts", "Card power draw", lambda r: r.power_w)
        yield gauge("hyrun_card_utilization_ratio", "Share of time the card was busy (0..1)", lambda r: r.utilization)
        yield gauge("hyrun_card_memory_used_bytes", "Card memory in use", lambda r: r.memory_used_bytes)
        yield gauge("hyrun_card_memory_total_bytes", "Card memory", lambda r: r.memory_total_bytes)
        yield gauge("hyrun_card_quarantined", "1 while the card is kept out of the job (evicted or drained)",
                    lambda r: 1.0 if r.quarantined else 0.0)
        ecc = CounterMetricFamily("hyrun_card_ecc_uncorrected_errors", "Uncorrectable ECC errors (NVML volatile count)",
                                  labels=_LABELS)
        xid = CounterMetricFamily("hyrun_card_xid_events", "XID events seen, by XID code; fatal: one the job evicts for",
                                  labels=_LABELS + ["xid", "fatal"])
        throttle = GaugeMetricFamily("hyrun_card_throttle_reasons",
                                     "1 for each reason the card's clocks are held down now (NVML clocks-event reasons)",
                                     labels=_LABELS + ["reason"])
        fatal_xids = self.fatal_xids
        for row in exported:
            labels = [row.node, str(row.card), row.card_type]
            ecc.add_metric(labels, row.ecc_uncorrected)
            for code, count in sorted(row.xid_counts.items()):
                xid.add_metric([*labels, str(code), "true" if code in fatal_xids else "false"], count)
            for reason in throttle_reasons(row.throttle_mask):
                throttle.add_metric([*labels, reason], 1.0)
        yield ecc
        yield xid
        yield throttle
        unexported = GaugeMetricFamily("hyrun_cards_unexported", "Cards left out of the per-card series by the cardinality limit")
        unexported.add_metric([], cards - len(exported))
        yield unexported
        yield from histograms


def riskiest_slots(cols: dict, limit: int) -> np.ndarray:
    """`cards_to_export` over a snapshot's columns: positions of the cards that get series, troubled
    first, then the smallest temperature margin (ties: node, then card, by registration order)."""
    n = len(cols["card_index"])
    if n <= limit:
        return np.arange(n)
    troubled = (cols["quarantined"] | cols["has_xid"] | (cols["ecc_uncorrected"] > 0)
                | ((cols["throttle_mask"] & _TROUBLE_MASK) != 0))  # fmt: skip
    margin = _margins(cols)
    order = np.lexsort((cols["card_index"], cols["slot_node"], np.nan_to_num(margin, nan=np.inf), ~troubled))
    return order[:limit]


def _margins(cols: dict) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(cols["slowdown_c"] > 0, cols["slowdown_c"] - cols["temperature_c"], np.inf)


_EMPTY = {"card_type": np.zeros(0, np.int64), "temperature_c": np.zeros(0), "slowdown_c": np.zeros(0),
          "utilization": np.zeros(0), "seen_s": np.zeros(0)}  # fmt: skip


def _fleet_histograms(cols: dict, types: list[str]):
    """Every card, exported as its own series or not, counted by card type: its temperature margin
    (slowdown threshold - temperature: how close the fleet runs to throttling) and its utilization
    (how much of it is busy, and how much sits slow or idle)."""
    margin = _margins(cols)
    yield _by_type(
        GaugeHistogramMetricFamily("hyrun_cards_temperature_margin_celsius",
                                   "Cards by how far below their slowdown temperature they run", labels=["card_type"]),
        margin, np.isfinite(margin) & ~np.isnan(cols["temperature_c"]), MARGIN_BUCKETS_C, cols["card_type"], types,
    )  # fmt: skip
    yield _by_type(
        GaugeHistogramMetricFamily("hyrun_cards_utilization_ratio", "Cards by the share of time they were busy (0..1)",
                                   labels=["card_type"]),
        cols["utilization"], ~np.isnan(cols["seen_s"]), UTILIZATION_BUCKETS, cols["card_type"], types,
    )  # fmt: skip


def _by_type(family: GaugeHistogramMetricFamily, values: np.ndarray, known: np.ndarray, buckets: tuple,
             card_type: np.ndarray, types: list[str]) -> GaugeHistogramMetricFamily:  # fmt: skip
    values, card_type = values[known], card_type[known]
    bucket = np.searchsorted(buckets, values, side="left")  # le: a value on a bound falls in that bucket
    bounds = [*map(str, buckets), "+Inf"]
    for tid in np.unique(card_type):
        mine = card_type == tid
        cumulative = np.cumsum(np.bincount(bucket[mine], minlength=len(bounds)))
        family.add_metric([types[tid]], [(b, float(c)) for b, c in zip(bounds, cumulative)],
                          gsum_value=float(values[mine].sum()))
    return family
