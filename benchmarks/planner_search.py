"""How long does the planner take? Search (with the naive plan, as `hyrun plan` runs it) and replan
(one node evicted, as the coordinator runs it) on clusters of 3-4 card types, 8 cards per node.
Goals (2 cores): search within 1 s at 64 cards and within 60 s at 10,240.

    python benchmarks/planner_search.py [--sizes 64,1024,10240] [--types 4]

64 cards train a Mixtral-8x7B-shaped model (Hunyuan-Large does not fit in 64 cards' memory);
1,024 and 10,240 train Hunyuan-Large (389B) on 16M-token global batches.
Times are CPU seconds of this process (wall seconds in brackets: other work on the box inflates those).
"""

from __future__ import annotations

import argparse
import time

from hyrun.planner import TrainingConfig, replan, search
from hyrun.planner.examples import hunyuan_large_shape, large_cluster, mixtral_shape

TYPES = ("H100-SXM", "A100-80GB", "H20", "L40S")
GOAL_S = {64: 1.0, 10240: 60.0}


def timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return value, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,1024,10240", help="cluster sizes in cards, multiples of 8")
    parser.add_argument("--types", type=int, default=4, choices=(3, 4), help="card types in the cluster")
    args = parser.parse_args()

    print(f"{'cards':>6} {'model':<14} {'search s':>17} {'replan s':>17} {'goal s':>7} {'best degrees':<28} "
          f"{'step s':>8} {'vs naive':>9}")
    ratios = []
    for size in (int(s) for s in args.sizes.split(",")):
        cluster = large_cluster(size, types=TYPES[:args.types])
        if size < 512:
            model, name = mixtral_shape(), "mixtral-8x7b"
            training = TrainingConfig(micro_batch_size=1, global_batch_sequences=1024)
        else:
            model, name = hunyuan_large_shape(), "hunyuan-large"
            training = TrainingConfig(micro_batch_size=1, global_batch_tokens=4096 * 4096)
        result, search_cpu, search_wall = timed(search, cluster, model, training)
        first_node = {card.global_id for card in cluster.cards_on_node(cluster.node_names[0])}
        _, replan_cpu, replan_wall = timed(replan, cluster, model, training, first_node)
        goal = GOAL_S.get(size)
        if goal:
            ratios.append((size, search_cpu / goal))
        speedup = result.speedup_vs_naive
        goal_text = f"{goal:.0f}" if goal else "-"
        print(f"{size:>6} {name:<14} {search_cpu:>7.2f} [{search_wall:>6.2f}] {replan_cpu:>7.2f} [{replan_wall:>6.2f}] "
              f"{goal_text:>7} {result.best.degrees.describe():<28} {result.best.step_time_s:>8.2f} "
              f"{'n/a' if speedup is None else f'{speedup:.2f}×':>9}")
    print()
    for size, ratio in ratios:
        print(f"search time / goal at {size} cards: {ratio:.2f} ({'met' if ratio <= 1 else 'missed'})")


if __name__ == "__main__":
    main()
