"""What a Prometheus scrape of the coordinator costs at cluster scale: series and bytes on /metrics,
and the seconds the scrape thread holds the interpreter (the coordinator's loop waits meanwhile),
with every card exported one series per family (the baseline) against hyrun's bound (the riskiest
`--limit` cards, every card in the per-type margin histogram). One heartbeat's samples are fed per
node first, and the cost of ingesting them is printed too.

    python benchmarks/metrics_scrape.py [--nodes 10000] [--cards-per-node 8] [--limit 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from prometheus_client import generate_latest

from hyrun.proto import hyrun_pb2 as pb
from hyrun.runtime.card_metrics import CARD_SERIES_LIMIT
from hyrun.runtime.metrics import CoordinatorMetrics


def fill(metrics: CoordinatorMetrics, beats: list[list[pb.CardTelemetry]]) -> float:
    started = time.perf_counter()
    for node, cards in enumerate(beats):
        metrics.cards_health.ingest(f"node-{node}", cards)
    return time.perf_counter() - started


def scrape(metrics: CoordinatorMetrics, repeats: int) -> tuple[float, int, int]:
    times, body = [], b""
    for _ in range(repeats):
        started = time.perf_counter()
        body = generate_latest(metrics.registry)
        times.append(time.perf_counter() - started)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return statistics.median(times), series, len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--cards-per-node", type=int, default=8)
    parser.add_argument("--limit", type=int, default=CARD_SERIES_LIMIT)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cards = args.nodes * args.cards_per_node
    beats = [
        [pb.CardTelemetry(index=i, temperature_c=40.0 + (n * 7 + i) % 50, slowdown_temperature_c=90.0, power_w=300.0,
                          utilization=0.9, memory_used_bytes=60 << 30) for i in range(args.cards_per_node)]
        for n in range(args.nodes)
    ]  # fmt: skip
    results = {}
    for name, limit in (("every card", cards), ("hyrun", args.limit)):
        metrics = CoordinatorMetrics(card_series_limit=limit)
        ingest_s = fill(metrics, beats)
        results[name] = scrape(metrics, args.repeats)
        seconds, series, size = results[name]
        print(f"{name:>10} (limit {limit:,}): ingest {ingest_s:.2f} s for {cards:,} cards; scrape {seconds:.2f} s, "
              f"{series:,} series, {size / 1e6:.1f} MB")  # fmt: skip
    base, ours = results["every card"], results["hyrun"]
    print(f"scrape time {base[0] / ours[0]:.1f}x less, series {base[1] / ours[1]:.1f}x fewer "
          f"({args.nodes:,} nodes x {args.cards_per_node} cards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
