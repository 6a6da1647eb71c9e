"""Which coordinator leads, decided by etcd: the leader holds one key (`/hyrun/leader`) bound to a
lease it keeps alive; a standby waits for that key to go (the leader resigned, or its lease ran out
because its process or host died) and creates it under its own lease. The key's create revision is
the leader's *epoch*: it only grows, every command the leader sends carries it (agents refuse a
lower one than they have seen), and every store write is fenced on it (store.fence).

The same pattern as etcd's own `concurrency.Election` (campaign = create-if-absent under a lease),
kept here because the Python client has no election helper."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from hyrun.runtime.coordinator.etcd_store import EtcdStore, EtcdUnavailable

log = logging.getLogger("hyrun.coordinator")

LEADER_KEY = "leader"
_POLL_S = 0.25  # how often a standby looks at the leader key


class EtcdLeadership:
    def __init__(self, store: EtcdStore, identity: dict[str, Any], ttl_s: int = 5) -> None:
        if ttl_s < 2:
            raise ValueError(f"leader lease TTL {ttl_s} s: etcd grants no lease shorter than 2 s")
        self.store = store
        self.key = store.full_key(LEADER_KEY)
        self.identity = identity
        self.ttl_s = ttl_s
        self.epoch = 0
        self.lost = threading.Event()  # set when etcd says the lease is gone: another may lead
        self._lease = None
        self._stop = threading.Event()

    def holder(self) -> dict[str, Any] | None:
        """The current leader's identity, or None when nobody leads."""
        raw, _meta = self.store.call("get leader", self.store.client.get, self.key)
        return None if raw is None else json.loads(raw)

    def campaign(self, stop: threading.Event, wait_s: float | None = None,
                 on_wait: Callable[[dict[str, Any]], None] = lambda holder: None) -> bool:  # fmt: skip
        """Blocks until this coordinator leads (True), or `stop` is set or `wait_s` passes (False).
        `on_wait` hears once who leads meanwhile."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = False
        client, txn = self.store.client, self.store.client.transactions
        while not stop.is_set():
            try:
                holder = self.holder()
                if holder is None:
                    lease = self.store.call("grant lease", client.lease, self.ttl_s)
                    value = json.dumps(self.identity, sort_keys=True)
                    won, responses = self.store.call(
                        "campaign", client.transaction, compare=[txn.create(self.key) == 0],
                        success=[txn.put(self.key, value, lease)], failure=[],
                    )  # fmt: skip
                    if won:
                        self._lease, self.epoch = lease, responses[0].response_put.header.revision
                        threading.Thread(target=self._keep_alive, name="leader-lease", daemon=True).start()
                        return True
                    self.store.call("revoke lease", client.revoke_lease, lease.id)
                elif not told:
                    told = True
                    on_wait(holder)
            except EtcdUnavailable as error:
                log.warning("campaign: %s", error)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            stop.wait(_POLL_S)
        return False

    def _keep_alive(self) -> None:
        """Refreshes the lease every third of its TTL. While etcd is down this keeps trying (etcd
        restores leases when it comes back); only etcd saying the lease is gone ends leadership."""
        while not self._stop.wait(self.ttl_s / 3):
            try:
                responses = self.store.call("keep the leader lease", self._lease.refresh)
            except EtcdUnavailable as error:
                log.warning("leader lease not refreshed: %s", error)
                continue
            if responses and responses[0].TTL <= 0:
                log.error("the leader lease (epoch %d) ran out: another coordinator may lead", self.epoch)
                self.lost.set()
                return

    def resign(self) -> None:
        """Gives leadership up at once (a clean stop): a standby need not wait for the TTL."""
        self._stop.set()
        if self._lease is not None:
            try:
                self.store.call("resign", self.store.client.revoke_lease, self._lease.id)
            except (EtcdUnavailable, ValueError) as error:
                log.warning("could not resign (the lease runs out by itself): %s", error)
            self._lease = None
