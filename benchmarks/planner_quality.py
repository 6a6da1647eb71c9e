"""How good are the planner's plans? On random small mixed clusters, compare the search's predicted
step time with the exhaustive oracle's (goal: within 3%) and with the naive plan's (uniform split, cards
in id order, as a homogeneous framework would lay them out).

    python benchmarks/planner_quality.py [--clusters 50] [--seed 0] [--max-cards 8] [--max-nodes 3]
                                         [--mixed-nodes] [--layers 8]

Prints one line per cluster, then the summary; the last line is the median speedup over naive.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from hyrun.planner import search
from hyrun.planner.examples import random_small_cluster, small_moe_shape, small_training
from hyrun.planner.oracle import oracle_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cards", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--mixed-nodes", action="store_true", help="nodes may hold two card types")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64, help="global batch in sequences of 4096 tokens")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    model, training = small_moe_shape(args.layers), small_training(args.sequences)
    gaps, speedups, search_s, oracle_s = [], [], [], []
    print(f"model: {args.layers} layers, 8 experts top-2, hidden 2048; {args.sequences} sequences of 4096 tokens")
    print(f"{'#':>3} {'cluster':<52} {'search s':>9} {'oracle s':>9} {'vs oracle':>10} {'vs naive':>9}  best degrees")
    for index in range(args.clusters):
        cluster = random_small_cluster(rng, max_cards=args.max_cards, max_nodes=args.max_nodes,
                                       mixed_nodes=args.mixed_nodes)
        start = time.perf_counter()
        result = search(cluster, model, training)
        middle = time.perf_counter()
        oracle = oracle_search(cluster, model, training)
        end = time.perf_counter()
        gap = result.best.step_time_s / oracle.step_time_s - 1
        speedup = result.speedup_vs_naive
        gaps.append(gap)
        search_s.append(middle - start)
        oracle_s.append(end - middle)
        if speedup is not None:
            speedups.append(speedup)
        print(f"{index:>3} {cluster.describe():<52.52} {middle - start:>9.3f} {end - middle:>9.3f} {gap:>+9.2%} "
              f"{'n/a' if speedup is None else f'{speedup:.2f}×':>9}  {result.best.degrees.describe()}")

    within = sum(gap <= 0.03 for gap in gaps)
    exact = sum(gap <= 1e-9 for gap in gaps)
    print()
    print(f"search vs oracle: {exact}/{len(gaps)} equal, {within}/{len(gaps)} within 3% (goal: all); "
          f"mean gap {statistics.mean(gaps):+.3%}, worst {max(gaps):+.2%}")
    print(f"search time: median {statistics.median(search_s) * 1e3:.0f} ms, max {max(search_s) * 1e3:.0f} ms; "
          f"oracle time: median {statistics.median(oracle_s):.2f} s, max {max(oracle_s):.2f} s")
    print(f"naive plan fits on {len(speedups)}/{len(gaps)} clusters; speedup vs naive: "
          f"min {min(speedups):.2f}×, max {max(speedups):.2f}×")
    print(f"median predicted speedup vs naive: {statistics.median(speedups):.2f}×")


if __name__ == "__main__":
    main()
