"""The data-network rules, pure functions of each node's recent NIC samples: a link without carrier
(the node's peers cannot reach it, though its agent still reports over the control network), and a
congested link (its egress queue keeps holding packets back while its peers' queues do not: the link,
not the job, sets the pace of every collective), drained when far off, else replanned with the bandwidth
it was measured to move. Each link's effective bandwidth is fitted over the window (least squares of
its per-heartbeat rate against time): a congested link whose fit heads below the bar within another
window is replanned before it gets there."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hyrun.runtime.coordinator.actions import Cause, Evidence, VerdictKind
from hyrun.runtime.coordinator.view import NicSampleView
from hyrun.runtime.jobfile import HealthSection

_BITS_PER_MBIT = 1e6


def link_down(node: str, samples: Sequence[NicSampleView]) -> Evidence | None:
    """The node's data NIC lost carrier in its latest sample."""
    if samples and not samples[-1].carrier:
        return Evidence.of(Cause.LINK_DOWN, node=node, interface=samples[-1].interface)
    return None


def link_back(node: str, samples: Sequence[NicSampleView]) -> bool:
    """Carrier in the last two samples: up again, and not flapping within one heartbeat."""
    return len(samples) >= 2 and samples[-1].carrier and samples[-2].carrier


def congested_links(nics: Mapping[str, Sequence[NicSampleView]], settings: HealthSection) -> dict[str, tuple[VerdictKind, Evidence]]:
    """Nodes whose data link is congested and slower than their peers have shown they can go: far
    slower (below `link_drain_ratio` of them) → drain; else below `link_replan_ratio` → replan with
    the measured bandwidth.

    Congested: the egress queue held packets back (or an RDMA port waited for credit) between at
    least `link_strikes` of the last `link_window_samples` heartbeats while no peer's did. In a collective every node moves at the
    pace of the slowest link, so its peers' rates *now* say nothing; their peak over the samples kept
    (before the link degraded) is what the job can reach without it."""
    window = settings.link_window_samples
    strikes, rates, peaks, fitted = {}, {}, {}, {}
    for node, samples in nics.items():
        samples = list(samples)
        if len(samples) < window + 1:
            continue
        recent = list(zip(samples[-(window + 1):], samples[-window:]))
        strikes[node] = sum(1 for a, b in recent if _held_back(a, b))
        rates[node] = sum(_mbit(a, b) for a, b in recent) / window
        peaks[node] = max(_mbit(a, b) for a, b in zip(samples, samples[1:]))
        fitted[node] = link_trend(samples[-(window + 1):])
    found = {}
    for node, count in strikes.items():
        peers = [peaks[p] for p in strikes if p != node and strikes[p] < settings.link_strikes]
        if count < settings.link_strikes or not peers:
            continue
        peers_mbit = sorted(peers)[len(peers) // 2]
        now_mbit, slope = fitted[node]
        span_s = nics[node][-1].time_s - nics[node][-(window + 1)].time_s
        heading_mbit = now_mbit + slope * span_s  # where the fit is one window from now
        bar_mbit = settings.link_replan_ratio * peers_mbit
        if rates[node] >= bar_mbit and heading_mbit >= bar_mbit:
            continue
        kind = VerdictKind.DRAIN if rates[node] < settings.link_drain_ratio * peers_mbit else VerdictKind.REPLAN
        found[node] = (kind, Evidence.of(Cause.LINK_CONGESTED, node=node, interface=nics[node][-1].interface,
                                         strikes=count, window=window, mbit=_planned_mbit(rates[node], heading_mbit, bar_mbit,
                                                                                     settings.link_drain_ratio * peers_mbit),
                                         peers_mbit=peers_mbit, trend_mbit_per_s=slope))
    return found


def _planned_mbit(rate: float, heading: float, bar: float, floor: float) -> float:
    """The bandwidth to plan with: what it moves when already below the bar; else (only trending
    there) where the fit heads, but not below the drain bar (a trend is not a measurement)."""
    return rate if rate < bar else max(heading, floor)


def link_trend(samples: Sequence[NicSampleView]) -> tuple[float, float]:
    """The link's effective bandwidth fitted over these samples: (Mbit/s at the last sample, its
    change in Mbit/s per second), a least-squares line through the per-interval rates."""
    points = [((a.time_s + b.time_s) / 2, _mbit(a, b)) for a, b in zip(samples, samples[1:]) if b.time_s > a.time_s]
    if not points:
        return 0.0, 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    slope = 0.0 if var_t <= 0 else sum((t - mean_t) * (r - mean_r) for t, r in points) / var_t
    return mean_r + slope * (samples[-1].time_s - mean_t), slope


def _held_back(a: NicSampleView, b: NicSampleView) -> bool:
    """Between two samples the egress queue held packets back, or an RDMA port waited for credit."""
    return b.queue_overlimits > a.queue_overlimits or b.rdma_xmit_wait > a.rdma_xmit_wait


def _mbit(a: NicSampleView, b: NicSampleView) -> float:
    elapsed_s = b.time_s - a.time_s
    moved = (b.tx_bytes - a.tx_bytes) + (b.rdma_tx_bytes - a.rdma_tx_bytes)
    return 0.0 if elapsed_s <= 0 else moved * 8 / elapsed_s / _BITS_PER_MBIT
