"""Per-card Prometheus series, built at scrape time from the newest heartbeat sample of each card.

A heartbeat replaces each card's row here (under a lock shared with the scrape thread, which copies
only the list: rows are never changed once stored); the families are made when Prometheus asks. Cardinality is bounded: at most
`limit` cards are exported one series each, chosen by `cards_to_export` (quarantined cards and cards
with XID, ECC or throttle events first, then the smallest temperature margin); every card, exported
or not, is counted in a per-type histogram of temperature margin, so a 10,000-node fleet costs
`limit` × (about ten) series plus a few per card type, not 80,000 × ten.
"""

from __future__ import annotations

import bisect
import heapq
import math
import threading
from dataclasses import dataclass, field, replace

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily

# Default bound on cards exported as their own series (DESIGN: Monitoring). A node has 8 cards, so
# 4,096 cards is 512 nodes in full detail; beyond that, the riskiest 4,096 and the histograms.
CARD_SERIES_LIMIT = 4096

# NVML clocks-event reasons (nvmlClocksEventReason*), by bit. "gpu_idle" and "applications_clocks"
# are not trouble, but they are what NVML says, so they are exported too (dashboards filter them).
THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
    0x100: "display_clocks",
}  # fmt: skip
_TROUBLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80  # reasons that slow a card down for its own sake
MARGIN_BUCKETS_C = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)

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
    """A prometheus_client collector (registered on the coordinator's registry)."""

    def __init__(self, limit: int = CARD_SERIES_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, int], CardRow] = {}
        self._quarantined: frozenset[tuple[str, int]] = frozenset()
        self.fatal_xids: frozenset[int] = frozenset()  # the running job's (HealthSection.fatal_xids)

    # ---- the coordinator's loop --------------------------------------------------------------

    def register_node(self, node: str, cards: list[tuple[int, str, int]]) -> None:
        """A node registered: (index, card type, memory bytes) of each card."""
        with self._lock:
            for index, card_type, memory_bytes in cards:
                old = self._rows.get((node, index), CardRow(node, index))
                self._rows[(node, index)] = replace(old, card_type=card_type or "unknown", memory_total_bytes=memory_bytes)

    def ingest(self, node: str, samples) -> None:
        """A heartbeat's CardTelemetry messages (proto/hyrun.proto). Each card's row is replaced, never
        changed in place (its XID counts are copied on write), so a scrape can read rows unlocked."""
        with self._lock:
            for s in samples:
                key = (node, s.index)
                old = self._rows.get(key)
                card_type, memory_total, xids = (old.card_type, old.memory_total_bytes, old.xid_counts) if old else ("unknown", 0, {})
                if s.xid_events:
                    xids = dict(xids)
                    for xid in s.xid_events:
                        xids[xid] = xids.get(xid, 0) + 1
                self._rows[key] = CardRow(
                    node, s.index, card_type, memory_total, s.temperature_c, s.slowdown_temperature_c, s.power_w,
                    s.utilization, s.memory_used_bytes, s.ecc_uncorrected, s.throttle_reasons, xids,
                )  # fmt: skip

    def set_quarantined(self, cards: frozenset[tuple[str, int]]) -> None:
        self._quarantined = cards  # one reference swap: the scrape thread sees the old or the new set

    # ---- the scrape thread -------------------------------------------------------------------

    def _snapshot(self) -> list[CardRow]:
        quarantined = self._quarantined
        with self._lock:  # only the list is copied: rows are replaced, never changed (see ingest)
            rows = list(self._rows.values())
        return [replace(r, quarantined=True) if (r.node, r.card) in quarantined else r for r in rows]

    def describe(self):
        return list(self._families([], []))

    def collect(self):
        rows = self._snapshot()
        return list(self._families(rows, cards_to_export(rows, self.limit)))

    def _families(self, rows: list[CardRow], exported: list[CardRow]):
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
        unexported.add_metric([], len(rows) - len(exported))
        yield unexported
        yield _margin_histogram(rows)


def _margin_histogram(rows: list[CardRow]) -> GaugeHistogramMetricFamily:
    """Every card's temperature margin (slowdown threshold - temperature), by card type: how close
    the whole fleet runs to throttling, whatever the per-card limit left out."""
    family = GaugeHistogramMetricFamily(
        "hyrun_cards_temperature_margin_celsius", "Cards by how far below their slowdown temperature they run",
        labels=["card_type"],
    )
    counts: dict[str, list[int]] = {}  # card type -> cards per bucket (not cumulative), +Inf last
    sums: dict[str, float] = {}
    for row in rows:
        if not math.isnan(row.temperature_c) and row.slowdown_c > 0:
            margin = row.slowdown_c - row.temperature_c
            counts.setdefault(row.card_type, [0] * (len(MARGIN_BUCKETS_C) + 1))[bisect.bisect_left(MARGIN_BUCKETS_C, margin)] += 1
            sums[row.card_type] = sums.get(row.card_type, 0.0) + margin
    for card_type, per_bucket in sorted(counts.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, MARGIN_BUCKETS_C), "+Inf"], per_bucket):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        family.add_metric([card_type], buckets, gsum_value=sums[card_type])
    return family
