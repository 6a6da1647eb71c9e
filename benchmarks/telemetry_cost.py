"""What health sampling costs the agent: CPU seconds per heartbeat's sample (host counters through
psutil, the node's cards through NVML where there are GPUs, simulated cards otherwise), as a share
of one core at the heartbeat rate. Goal: <= 1% of one core at 1 Hz.

    python benchmarks/telemetry_cost.py [--samples 200] [--cards 8] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time

from hyrun.agent.cards import nvml_cards
from hyrun.agent.telemetry import SimulatedCards, sample_host


def cpu_seconds_per_call(fn, samples: int) -> float:
    fn()  # first call primes psutil's and NVML's state
    started = time.process_time()
    for _ in range(samples):
        fn()
    return (time.process_time() - started) / samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--cards", type=int, default=8, help="simulated cards when no GPU is found")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, seconds")
    args = parser.parse_args()

    real = nvml_cards()
    if real:
        from hyrun.agent.nvml import NvmlCards

        cards, source = NvmlCards([c.index for c in real]), f"NVML ({len(real)} x {real[0].type})"
    else:
        cards, source = SimulatedCards(list(range(args.cards))), f"simulated ({args.cards} cards)"
    host_s = cpu_seconds_per_call(sample_host, args.samples)
    cards_s = cpu_seconds_per_call(cards.sample, args.samples)
    total_s = host_s + cards_s
    print(f"host (psutil): {host_s * 1e6:.0f} µs CPU per sample")
    print(f"cards, {source}: {cards_s * 1e6:.0f} µs CPU per sample")
    print(f"share of one core at one sample per {args.interval:g} s: {total_s / args.interval:.3%} (goal <= 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
