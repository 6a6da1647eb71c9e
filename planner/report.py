"""What `hyrun plan job.yaml [--json]` prints: the chosen plan next to the naive one, as a table for
people or a JSON-friendly dict for tools."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .cards import GIB
from .plan import Plan
from .search import SearchResult

# Beyond this many cards, the per-card table groups cards that play the same role.
PER_CARD_ROWS_LIMIT = 64


def _counts(values: tuple[int, ...]) -> str:
    """(32, 32, 32) → '32 × 3'; short uneven lists as they are; long ones as a range."""
    if len(values) == 1:
        return str(values[0])
    if len(set(values)) == 1:
        return f"{values[0]} × {len(values)}"
    if len(values) <= 12:
        return " ".join(str(v) for v in values)
    return f"{min(values)}..{max(values)} over {len(values)}"


def _column(plan: Plan | None) -> dict[str, str]:
    if plan is None:
        return {"degrees": "(nothing fits)"}
    rows = {
        "degrees": plan.degrees.describe(),
        "cards used": f"{plan.degrees.world_size} (+{len(plan.unused_cards)} idle)",
        "layers per stage": _counts(plan.layers_per_stage),
        "micro-batches per replica": _counts(plan.micro_batches_per_replica),
        "predicted step time": f"{plan.step_time_s:.4g} s",
        "peak memory per card": f"{plan.peak_memory_gib:.2f} GiB",
    }
    for name, seconds in plan.terms.as_dict().items():
        rows[f"  {name}"] = f"{seconds:.4g}"
    return rows


def _table(columns: dict[str, dict[str, str]]) -> list[str]:
    names = list(dict.fromkeys(key for column in columns.values() for key in column))
    width = max(len(n) for n in names) + 2
    widths = {title: max([len(title)] + [len(v) for v in column.values()]) + 2 for title, column in columns.items()}
    lines = [" " * width + "".join(title.ljust(widths[title]) for title in columns)]
    for name in names:
        lines.append(name.ljust(width) + "".join(column.get(name, "").ljust(widths[title])
                                                 for title, column in columns.items()))
    return lines


def _role_rows(plan: Plan, result: SearchResult) -> list[str]:
    cards = {card.global_id: card for card in result.cluster.cards}
    ranges = plan.stage_layer_ranges
    header = f"{'card':>6} {'node':<12} {'type':<12} {'rank':>5} {'stage':>5} {'layers':>9} {'replica':>7} " \
             f"{'ep':>3} {'micro-batches':>13} {'memory GiB':>16}"
    roles = []
    for rank, card_id in enumerate(plan.rank_to_card):
        p, d, c, t = plan.degrees.coordinate(rank)
        card = cards[card_id]
        layers = f"{ranges[p][0]}-{ranges[p][1] - 1}"
        memory = plan.memory_per_rank[rank]
        roles.append((card_id, card.node, card.spec.name, rank, p, layers, d, plan.degrees.ep_rank(d, c),
                      plan.micro_batches_per_replica[d], memory.total_bytes / GIB, memory.capacity_bytes / GIB))
    if len(roles) <= PER_CARD_ROWS_LIMIT:
        lines = [header]
        lines += [f"{cid:>6} {node:<12.12} {kind:<12.12} {rank:>5} {p:>5} {layers:>9} {d:>7} {ep:>3} {mb:>13} "
                  f"{f'{used:.2f} / {cap:.0f}':>16}"
                  for cid, node, kind, rank, p, layers, d, ep, mb, used, cap in roles]
    else:
        groups = Counter((kind, p, layers, mb, round(used, 2), round(cap))
                         for _, _, kind, _, p, layers, _, _, mb, used, cap in roles)
        lines = [f"{'cards':>6} {'type':<12} {'stage':>5} {'layers':>9} {'micro-batches':>13} {'memory GiB':>16}"]
        lines += [f"{n:>6} {kind:<12.12} {p:>5} {layers:>9} {mb:>13} {f'{used:.2f} / {cap:.0f}':>16}"
                  for (kind, p, layers, mb, used, cap), n in sorted(groups.items(), key=lambda kv: kv[0][1:])]
    for card_id in plan.unused_cards:
        lines.append(f"{card_id:>6} {cards[card_id].node:<12.12} {cards[card_id].spec.name:<12.12}  idle")
    return lines


def format_comparison(result: SearchResult) -> str:
    """Human table: degrees, layers and micro-batches, step time and memory, the searched plan next to
    the naive one, the predicted speedup, runner-ups, then each card's role in the searched plan."""
    cluster = result.cluster
    lines = [f"cluster: {cluster.describe()} ({len(cluster)} cards)", ""]
    lines += _table({"searched": _column(result.best), "naive (uniform)": _column(result.naive)})
    speedup = result.speedup_vs_naive
    lines += ["", f"predicted speedup vs naive: {speedup:.2f}×" if speedup is not None
              else "predicted speedup vs naive: n/a (no uniform layout fits in memory)"]
    if result.runner_ups:
        lines += ["", "runner-ups:"]
        lines += [f"  {plan.degrees.describe():<28} {plan.step_time_s:.4g} s" for plan in result.runner_ups]
    lines += ["", "cards in the searched plan:"] + _role_rows(result.best, result)
    return "\n".join(lines)


def result_to_json(result: SearchResult) -> dict[str, Any]:
    return {
        "cluster": {"description": result.cluster.describe(),
                    "cards": [{"id": c.global_id, "node": c.node, "local_index": c.local_index, "type": c.spec.name,
                               "speed": c.spec.speed, "memory_bytes": c.spec.memory_bytes}
                              for c in result.cluster.cards]},
        "best": result.best.to_dict(),
        "runner_ups": [plan.to_dict() for plan in result.runner_ups],
        "naive": None if result.naive is None else result.naive.to_dict(),
        "speedup_vs_naive": result.speedup_vs_naive,
    }
