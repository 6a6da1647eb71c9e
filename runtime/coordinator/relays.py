"""Which relay each node sends its heartbeats through (DESIGN: Scale). `assign_relays` is the
decision, a pure function; `RelayBook` is the coordinator's record of relays (who offered, who died,
whom each one carried) that feeds it. A relay's death is not its nodes' death: their silence is
counted again from the moment the relay was found dead, and they are routed elsewhere.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping

DEFAULT_FAN_IN = 100


def assign_relays(
    nodes: Iterable[str],
    relays: Mapping[str, str],
    fan_in: int,
    dead_relays: frozenset[str] = frozenset(),
    current: Mapping[str, str | None] | None = None,
    avoid: Mapping[str, str] | None = None,
    carried: Mapping[str, int] | None = None,
) -> dict[str, str | None]:
    """node -> relay (a node name in `relays`, which maps relay -> address) or None: straight to the
    coordinator. `carried`: nodes each relay already carries besides `nodes`. Sticky: a node keeps a
    relay that is alive, not avoided by it and not over `fan_in`; the rest go to the least loaded
    live relay with room (ties: by name), a relay carrying itself first. No relay with room left:
    None (the coordinator takes them directly)."""
    if fan_in < 1:
        raise ValueError(f"relay fan-in must be at least 1, got {fan_in}")
    current, avoid, carried = current or {}, avoid or {}, carried or {}
    live = sorted(r for r in relays if r not in dead_relays)
    load = {r: carried.get(r, 0) for r in live}
    out: dict[str, str | None] = {}
    pending = []
    ordered = sorted(set(nodes), key=lambda n: (n not in load, n))  # relays place themselves first
    for node in ordered:
        if node in load and avoid.get(node) != node:
            out[node], load[node] = node, load[node] + 1
            continue
        relay = current.get(node)
        if relay in load and avoid.get(node) != relay and load[relay] < fan_in:
            out[node], load[relay] = relay, load[relay] + 1
        else:
            pending.append(node)
    for node in pending:
        open_ = [r for r in live if load[r] < fan_in and avoid.get(node) != r]
        relay = min(open_, key=lambda r: (load[r], r)) if open_ else None
        out[node] = relay
        if relay is not None:
            load[relay] += 1
    return out


def relays_needed(nodes: int, fan_in: int) -> int:
    return math.ceil(nodes / fan_in) if nodes else 0


def relay_phase_s(relay: str, interval_s: float) -> float:
    """When in each interval a relay's nodes beat: the same for all of them, so a round is one batch
    (not one per node), and spread over relays, so the coordinator's batches do not all come at once."""
    return (zlib.crc32(relay.encode()) % 1000) / 1000 * interval_s if relay else 0.0


@dataclass
class RelayBook:
    """The coordinator's relays. Called from its event loop only; time is passed in."""

    fan_in: int = DEFAULT_FAN_IN
    silence_s: float = 2.5                               # no batch for this long: the relay is dead
    addresses: dict[str, str] = field(default_factory=dict)      # live relay -> HOST:PORT
    last_batch_s: dict[str, float] = field(default_factory=dict)
    relay_of: dict[str, str] = field(default_factory=dict)       # node -> relay its newest batch came from
    load: dict[str, int] = field(default_factory=dict)           # relay -> nodes it carries (as relay_of says)
    dead: set[str] = field(default_factory=set)
    routes: dict[str, str | None] = field(default_factory=dict)  # node -> relay it was told
    avoid: dict[str, str] = field(default_factory=dict)          # node -> the relay it could not reach

    def offered(self, relay: str, address: str, now_s: float) -> None:
        """A relay opened its stream (again)."""
        self.addresses[relay] = address
        self.last_batch_s[relay] = now_s
        self.dead.discard(relay)

    def batch(self, relay: str, nodes: Iterable[str], now_s: float) -> None:
        self.last_batch_s[relay] = now_s
        relay_of = self.relay_of
        for node in [n for n in nodes if relay_of.get(n) != relay]:  # moved nodes only: a few, not the batch
            self._move(node, relay)

    def _move(self, node: str, relay: str | None) -> None:
        old = self.relay_of.pop(node, None)
        if old is not None:
            self.load[old] -= 1
        if relay is not None:
            self.relay_of[node] = relay
            self.load[relay] = self.load.get(relay, 0) + 1

    def carried(self, relay: str) -> set[str]:
        return {n for n, r in self.relay_of.items() if r == relay}

    def died(self, relay: str) -> set[str]:
        """The relay's stream closed or fell silent: returns the nodes it carried."""
        self.dead.add(relay)
        self.addresses.pop(relay, None)
        self.last_batch_s.pop(relay, None)
        nodes = self.carried(relay) | {n for n, r in self.routes.items() if r == relay}
        for node in nodes:
            self._move(node, None)
            self.routes.pop(node, None)
        self.load.pop(relay, None)
        return nodes

    def silent(self, now_s: float) -> list[str]:
        return [r for r, t in self.last_batch_s.items() if now_s - t > self.silence_s]

    def route(self, node: str, failed_relay: str = "") -> tuple[str, str]:
        """(relay, address) for `node`; ("", "") sends it to the coordinator directly."""
        if failed_relay:
            self.avoid[node] = failed_relay
        current = self.routes.get(node, self.relay_of.get(node))
        self._move(node, None)  # placed afresh against every other node's load
        relay = assign_relays([node], self.addresses, self.fan_in, frozenset(self.dead), {node: current},
                              self.avoid, self.load)[node]  # fmt: skip
        self.routes[node] = relay
        self._move(node, relay)
        return (relay, self.addresses[relay]) if relay else ("", "")
