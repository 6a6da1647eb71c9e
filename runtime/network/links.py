"""Faults on the links of `NetnsHosts`: a bandwidth cap (`tc ... tbf`; this kernel has tbf and htb
but no netem, so no delay or loss model), a link down (data, control, or both: a partition), and
their repair. Applied from the root namespace by whoever owns the hosts (the launcher, a test)."""

from __future__ import annotations

from .hosts import DATA_IF, NetnsHosts, run

LINKS = ("data", "control", "both")


def cap_bandwidth(hosts: NetnsHosts, node: str, mbit: float) -> None:
    """Both directions of `node`'s data link limited to `mbit` Mbit/s (a congested or degraded NIC)."""
    host = hosts.hosts[node]
    # Burst of at least one full-size frame per tick; a queue of ~100 ms at that rate.
    rate, burst, limit = f"{mbit}mbit", f"{max(16, int(mbit * 4))}kb", f"{max(32, int(mbit * 12.5))}kb"
    for device, namespace in ((DATA_IF, host.namespace), (host.data_veth, None)):
        run("tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate, "burst", burst, "limit", limit,
            namespace=namespace)


def uncap(hosts: NetnsHosts, node: str) -> None:
    host = hosts.hosts[node]
    for device, namespace in ((DATA_IF, host.namespace), (host.data_veth, None)):
        run("tc", "qdisc", "del", "dev", device, "root", namespace=namespace, check=False)


def set_link(hosts: NetnsHosts, node: str, link: str, up: bool) -> None:
    """`node`'s data or control link (or both) down or up, from the bridge's side."""
    if link not in LINKS:
        raise ValueError(f"link {link!r}: choose one of {', '.join(LINKS)}")
    host = hosts.hosts[node]
    devices = {"data": [host.data_veth], "control": [host.control_veth],
               "both": [host.data_veth, host.control_veth]}[link]
    for device in devices:
        run("ip", "link", "set", device, "up" if up else "down")
