"""The data NIC's counters, sampled each heartbeat: the kernel's cumulative interface statistics
(sysfs) and its egress queue's (`tc -s -j qdisc`), from which the coordinator tells a link that is
down (no carrier) or congested (the queue holds packets back) from one that is merely busy."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

_SYSFS = Path("/sys/class/net")
_RDMA_SYSFS = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class NicSample:
    interface: str
    carrier: bool
    tx_bytes: int = 0
    rx_bytes: int = 0
    errors: int = 0
    drops: int = 0
    queue_overlimits: int = 0
    queue_drops: int = 0
    queue_backlog_bytes: int = 0
    rdma_tx_bytes: int = 0
    rdma_rx_bytes: int = 0
    rdma_xmit_wait: int = 0
    rdma_link_downed: int = 0


def sample_nic(interface: str, rdma_root: Path = _RDMA_SYSFS) -> NicSample:
    """One reading of `interface` (as this process's network namespace sees it), with the host's
    RDMA port counters where readable."""
    base = _SYSFS / interface
    stats = {name: _read_int(base / "statistics" / name) for name in
             ("tx_bytes", "rx_bytes", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")}
    overlimits, drops, backlog = _queue_stats(interface)
    return NicSample(
        interface=interface, carrier=_read_int(base / "carrier") == 1,
        tx_bytes=stats["tx_bytes"], rx_bytes=stats["rx_bytes"],
        errors=stats["rx_errors"] + stats["tx_errors"], drops=stats["rx_dropped"] + stats["tx_dropped"],
        queue_overlimits=overlimits, queue_drops=drops, queue_backlog_bytes=backlog,
        **rdma_counters(rdma_root),
    )


def rdma_counters(root: Path = _RDMA_SYSFS) -> dict[str, int]:
    """Every RDMA port's counters summed (`/sys/class/infiniband/DEV/ports/N/counters`). The data
    counters count 4-byte words (the InfiniBand spec); xmit_wait counts ticks a port waited for
    credit to send, the fabric's congestion signal. Zeros where there is no RDMA hardware."""
    totals = {"rdma_tx_bytes": 0, "rdma_rx_bytes": 0, "rdma_xmit_wait": 0, "rdma_link_downed": 0}
    for counters in sorted(root.glob("*/ports/*/counters")):
        totals["rdma_tx_bytes"] += 4 * _read_int(counters / "port_xmit_data")
        totals["rdma_rx_bytes"] += 4 * _read_int(counters / "port_rcv_data")
        totals["rdma_xmit_wait"] += _read_int(counters / "port_xmit_wait")
        totals["rdma_link_downed"] += _read_int(counters / "link_downed")
    return totals


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # carrier reads EINVAL while the interface is down
        return 0


def _queue_stats(interface: str) -> tuple[int, int, int]:
    """(overlimits, drops, backlog bytes) summed over the interface's qdiscs; zeros without `tc`."""
    try:
        done = subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", interface], capture_output=True,
                              text=True, timeout=2)
        qdiscs = json.loads(done.stdout or "[]") if done.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0, 0, 0
    return (sum(int(q.get("overlimits", 0)) for q in qdiscs), sum(int(q.get("drops", 0)) for q in qdiscs),
            sum(int(q.get("backlog", 0)) for q in qdiscs))
