"""Which nodes and cards exist and are alive. Ingest only: the server feeds registrations and
heartbeats; whether a silent node is lost is decide()'s call (MarkNodeLost), applied here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CardRecord:
    index: int
    type: str
    memory_bytes: int
    speed: float
    simulated: bool


@dataclass
class NodeRecord:
    name: str
    host: str
    cards: tuple[CardRecord, ...]
    agent_pid: int
    last_heartbeat_s: float
    registered_s: float = 0.0
    alive: bool = True
    connected: bool = True
    heartbeats: int = 0
    telemetry: dict = field(default_factory=dict)
    restored: bool = False  # a placeholder read back from the store, until its agent registers again


class Membership:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeRecord] = {}

    def register(self, node: NodeRecord) -> None:
        """A node joining, or re-joining after its stream broke: the new record wins. A node that
        was in the job when the coordinator restarted keeps the placeholder's registration time:
        reconnecting to a new coordinator is not joining the job."""
        if not node.registered_s:
            node.registered_s = node.last_heartbeat_s
        old = self.nodes.get(node.name)
        if old is not None and old.restored:
            node.registered_s = old.registered_s
        self.nodes[node.name] = node

    def heartbeat(self, name: str, now_s: float) -> bool:
        node = self.nodes.get(name)
        if node is None or not node.alive:
            return False
        node.last_heartbeat_s = now_s
        node.heartbeats += 1
        return True

    def disconnect(self, name: str) -> None:
        node = self.nodes.get(name)
        if node is not None:
            node.connected = False

    def mark_lost(self, name: str) -> NodeRecord | None:
        """Stops planning on a node until it registers again; returns it if it was alive."""
        node = self.nodes.get(name)
        if node is None or not node.alive:
            return None
        node.alive = False
        return node

    def alive(self, names: list[str]) -> bool:
        return all(name in self.nodes and self.nodes[name].alive for name in names)

    def missing(self, names: list[str]) -> list[str]:
        return [name for name in names if name not in self.nodes or not self.nodes[name].alive]
