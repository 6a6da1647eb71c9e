"""`hyrun agent`: run this node's agent. The command lives with the agent; the CLI module (the
composition root) registers it. Cheap to import (`hyrun --help` pays for it): the agent's gRPC loop
and telemetry load only when the command runs."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hyrun.common.env import DEFAULT_SHM_DIR, SHM_DIR_ENV, TOKEN_ENV

EXIT_USAGE = 2


def agent(
    coordinator: Annotated[str, typer.Option(help="HOST:PORT of the coordinator; several, comma-separated, for a leader and its standbys")],
    node: Annotated[str, typer.Option(help="this node's name (unique in the cluster)")],
    cards_json: Annotated[Optional[str], typer.Option(help="simulated cards as job-file card groups (JSON)")] = None,
    simulate: Annotated[
        Optional[list[str]], typer.Option(help="simulated cards TYPE:COUNT[:SPEED], repeatable; default: NVML GPUs")
    ] = None,
    host: Annotated[str, typer.Option(help="address other nodes reach this one at (default: hostname)")] = "",
    data_interface: Annotated[str, typer.Option(help="network interface collectives use (sets GLOO_SOCKET_IFNAME and "
                                                     "NCCL_SOCKET_IFNAME for the workers); watched and reported "
                                                     "to the coordinator")] = "",
    heartbeat_interval: Annotated[float, typer.Option(help="seconds between heartbeats")] = 1.0,
    relay_listen: Annotated[str, typer.Option(help="HOST:PORT to also relay other nodes' heartbeats on, batched "
                                                   "to the coordinator (for clusters of thousands of nodes)")] = "",
    via_relays: Annotated[bool, typer.Option(help="send heartbeats through the relay the coordinator picks "
                                                  "(falls back to the coordinator directly)")] = False,
    reconnect_timeout: Annotated[float, typer.Option(help="seconds to keep workers while the coordinator is gone")] = 30.0,
    warm_workers: Annotated[int, typer.Option(help="spare worker processes kept ready for fast restarts (-1: one per card)")] = -1,
    shm_dir: Annotated[
        Optional[Path], typer.Option(help=f"tmpfs folder for RAM checkpoint snapshots (default: ${SHM_DIR_ENV} or {DEFAULT_SHM_DIR})")
    ] = None,
    parent_pid: Annotated[Optional[int], typer.Option(help="exit when this process dies (used by `hyrun launch`)")] = None,
    tls_ca: Annotated[Optional[Path], typer.Option(help="PEM certificate to trust: enables TLS to the coordinator", exists=True)] = None,
    relay_tls_cert: Annotated[Optional[Path], typer.Option(help="with --relay-listen under TLS: the relay's PEM certificate "
                                                             "(one the nodes' --tls-ca trusts)", exists=True)] = None,
    relay_tls_key: Annotated[Optional[Path], typer.Option(help="... and its PEM private key", exists=True)] = None,
    token_file: Annotated[
        Optional[Path], typer.Option(help=f"file holding the job token (default: ${TOKEN_ENV})", exists=True, dir_okay=False)
    ] = None,
) -> None:
    """Run a node agent: register this node's cards and run its workers."""
    # Loaded here, not at import: `hyrun --help` and every other command import this module.
    from hyrun.agent.cards import nvml_cards, simulated_cards
    from hyrun.agent.node_agent import AgentSettings, NodeAgent, install_signal_handlers
    from hyrun.agent.telemetry import SimulatedCards
    from hyrun.common.process import die_with_parent
    from hyrun.common.security import TlsFiles

    if parent_pid is not None:
        die_with_parent(parent_pid, signal.SIGTERM)  # SIGTERM: we still stop our workers first
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s agent[{node}] %(levelname)s %(message)s")
    try:
        groups = json.loads(cards_json) if cards_json else [parse_simulate(s) for s in simulate or []]
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        _fail(f"bad card description: {error}")
    cards = simulated_cards(groups) if groups else nvml_cards()
    if not cards:
        _fail("no cards: no NVIDIA GPU found by NVML; describe simulated ones with --simulate cpu-sim:2")
    if (relay_tls_cert is None) != (relay_tls_key is None):
        _fail("--relay-tls-cert and --relay-tls-key go together")
    if data_interface:
        # Workers inherit the environment: collectives go over this NIC, not whatever the hostname
        # resolves to (often the management network). An explicit setting from the user wins.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", data_interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", data_interface)
    token = token_file.read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "")
    settings = AgentSettings(
        coordinator=coordinator, node=node, cards=tuple(cards), host=host,
        heartbeat_interval_s=heartbeat_interval, reconnect_timeout_s=reconnect_timeout, warm_workers=warm_workers,
        token=token, tls=TlsFiles(cert=tls_ca), shm_dir=shm_dir or Path(os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR),
        data_interface=data_interface, relay_listen=relay_listen, via_relays=via_relays,
        relay_tls=TlsFiles(cert=relay_tls_cert, key=relay_tls_key),
    )  # fmt: skip
    if cards[0].simulated:
        telemetry = SimulatedCards([c.index for c in cards])
    else:
        from hyrun.agent.nvml import NvmlCards

        telemetry = NvmlCards([c.index for c in cards])
    node_agent = NodeAgent(settings, telemetry)
    install_signal_handlers(node_agent)
    code = node_agent.run()
    # Exit without the interpreter's teardown: finalizers of gRPC objects run there, and one once
    # deadlocked an agent on its way out. Everything the agent owns is stopped and freed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_simulate(text: str) -> dict:
    """A card group from TYPE:COUNT[:SPEED]."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"{text!r} is not TYPE:COUNT[:SPEED]")
    group = {"type": parts[0], "count": int(parts[1])}
    if len(parts) == 3:
        group["speed"] = float(parts[2])
    return group


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)
