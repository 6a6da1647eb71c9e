"""Every node of a job its own host on one machine: a Linux network namespace per node, joined to two
bridges by veth pairs — a data network (collectives) and a control network (coordinator, rendezvous),
as real clusters separate them — so that a link can be slowed, cut or partitioned per node.

Needs root (CAP_NET_ADMIN) and `ip`/`tc` (iproute2). Everything created is named `hy<tag>...` and
recorded; `close()` removes it on every exit path, and `sweep_stale()` removes what a killed owner
left behind (the owner's pid is part of the tag). Addresses are private 10.x subnets chosen so they
collide with no route on the machine. Traffic only ever goes to addresses inside namespaces created
here.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

DATA_IF, CONTROL_IF = "data0", "ctl0"
_PREFIX = "hy"
_TAG = re.compile(rf"^{_PREFIX}(\d+)[a-z]")
_CANDIDATE_SUBNETS = [ipaddress.ip_network(f"10.{second}.{third}.0/24") for second in (231, 232, 233, 234)
                      for third in range(0, 250, 2)]


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces (not root, no iproute2)."""


@dataclass(frozen=True)
class NodeHost:
    name: str  # the job's node name
    namespace: str
    data_ip: str
    control_ip: str
    data_veth: str  # the root-namespace end of the node's data link
    control_veth: str


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root or without --netns"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def run(*args: str, namespace: str | None = None, check: bool = True) -> str:
    """One iproute2 command (inside `namespace` if given); its stdout. Raises with stderr on failure."""
    command = (["ip", "netns", "exec", namespace] if namespace else []) + list(args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


class NetnsHosts:
    """Namespaces, bridges and veth pairs for `nodes`; a context manager that removes them all."""

    def __init__(self, nodes: list[str]) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        sweep_stale()
        # The pid (for sweeping), then a letter per instance: one process may build hosts again
        # while the kernel still tears down its last namespaces. Names stay within IFNAMSIZ (15).
        self.tag = f"{_PREFIX}{os.getpid()}{_next_letter()}"
        self._created_namespaces: list[str] = []
        self._created_links: list[str] = []
        data_net, control_net = _free_subnets(2)
        self.bridge_ip = {"data": str(data_net[1]), "control": str(control_net[1])}
        self.bridges = {"data": f"{self.tag}bd", "control": f"{self.tag}bc"}
        self.hosts: dict[str, NodeHost] = {}
        try:
            for kind, net in (("data", data_net), ("control", control_net)):
                bridge = self.bridges[kind]
                run("ip", "link", "add", bridge, "type", "bridge")
                self._created_links.append(bridge)
                run("ip", "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", bridge)
                run("ip", "link", "set", bridge, "up")
            for index, node in enumerate(nodes):
                self.hosts[node] = self._add_host(node, index, data_net, control_net)
        except BaseException:
            self.close()
            raise

    def _add_host(self, node: str, index: int, data_net, control_net) -> NodeHost:
        if index > 99:
            raise NetnsUnavailable("--netns builds at most 100 nodes (interface names are 15 characters)")
        namespace = f"{self.tag}n{index}"
        run("ip", "netns", "add", namespace)
        self._created_namespaces.append(namespace)
        run("ip", "link", "set", "lo", "up", namespace=namespace)
        ips = {}
        for kind, net, inner in (("data", data_net, DATA_IF), ("control", control_net, CONTROL_IF)):
            outer = f"{self.tag}{kind[0]}{index}"
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", f"{outer}p")
            self._created_links.append(outer)
            run("ip", "link", "set", f"{outer}p", "netns", namespace)
            run("ip", "link", "set", f"{outer}p", "name", inner, namespace=namespace)
            ips[kind] = str(net[10 + index])
            run("ip", "addr", "add", f"{ips[kind]}/{net.prefixlen}", "dev", inner, namespace=namespace)
            run("ip", "link", "set", inner, "up", namespace=namespace)
            run("ip", "link", "set", outer, "master", self.bridges[kind])
            run("ip", "link", "set", outer, "up")
        return NodeHost(node, namespace, ips["data"], ips["control"], f"{self.tag}d{index}", f"{self.tag}c{index}")

    def command(self, node: str, argv: list[str]) -> list[str]:
        """`argv` run inside `node`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[node].namespace, *argv]

    def close(self) -> None:
        # Links first (deleting one end of a veth pair deletes both), then the namespaces: the kernel
        # tears a namespace down only once its last process is gone, links with it.
        for link in reversed(self._created_links):
            run("ip", "link", "delete", link, check=False)
        for namespace in reversed(self._created_namespaces):
            run("ip", "netns", "delete", namespace, check=False)
        self._created_namespaces.clear()
        self._created_links.clear()

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


_instances = 0


def _next_letter() -> str:
    global _instances
    _instances += 1
    return "abcdefghijklmnopqrstuvwxyz"[(_instances - 1) % 26]


def sweep_stale() -> list[str]:
    """Removes namespaces and bridges whose owning process (the pid in their tag) no longer runs."""
    removed = []
    namespaces = [line.split()[0] for line in run("ip", "netns", "list", check=False).splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(run("ip", "-j", "link", "show", check=False) or "[]")]
    for name in namespaces + links:
        match = _TAG.match(name)
        if match and not _alive(int(match.group(1))):
            kind = "netns" if name in namespaces else "link"
            run("ip", kind, "delete", name, check=False)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_subnets(count: int) -> list:
    """`count` /24 subnets that overlap no address or route on this machine."""
    used = []
    for entry in json.loads(run("ip", "-j", "route", "show", "table", "all", check=False) or "[]"):
        destination = entry.get("dst", "")
        try:
            used.append(ipaddress.ip_network(destination, strict=False))
        except ValueError:
            continue  # "default", multicast names
    free = [net for net in _CANDIDATE_SUBNETS if not any(net.overlaps(u) for u in used if u.version == 4)]
    if len(free) < count:
        raise NetnsUnavailable("no free private /24 subnet for the namespaces' networks")
    return free[:count]
