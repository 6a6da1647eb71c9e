"""The job file's network faults, injected by whoever owns the namespaces (the launcher, through
`launch_faults.LauncherFaults`, which decides when): a bandwidth cap, a link down, a partition, a
control-plane cut, each with its repair."""

from __future__ import annotations

from typing import Callable

from hyrun.runtime.jobfile import FaultSpec

from .hosts import NetnsHosts
from .links import cap_bandwidth, set_link, uncap

_LINK_OF = {"link_down": "data", "partition": "both", "coordinator_unreachable": "control"}


def network_fault(hosts: NetnsHosts, fault: FaultSpec) -> Callable[[], None]:
    """Injects `fault` on its node's links; returns its repair."""
    if fault.kind == "link_slow":
        cap_bandwidth(hosts, fault.node, fault.mbit)
        return lambda: uncap(hosts, fault.node)
    link = _LINK_OF[fault.kind]
    set_link(hosts, fault.node, link, up=False)
    return lambda: set_link(hosts, fault.node, link, up=True)
