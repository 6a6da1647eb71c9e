"""Can one coordinator take heartbeats from 10,000 nodes of 8 cards at 1 Hz? For each N, in one run:

  baseline  one unary gRPC call per heartbeat (a naive server: decode, write the node's cards into
            the same numpy arrays) — what the DESIGN's Scale section says saturates near 3k calls/s;
  hyrun     the relay tier: relays (fan-in --fan-in) batch their nodes' beats into one columnar
            RelayBatch per round on a stream into the real coordinator (server.py, relay_ingest.py).

Printed per run: p50/p99 from a node's send (wall clock, stamped in the beat) to its cards being in
the coordinator's arrays, heartbeats lost (sent but never stored), and the coordinator's CPU (its
process's CPU time / wall time). At the largest N the hyrun run also silences one node (the time
until the coordinator marks it lost; goal: heartbeat timeout + 1 s) and kills one relay mid-run (its
nodes ask Route for another relay or fall back to their own Connect stream; goal: none marked lost).

Load generators are separate processes (bounded: at most 4), each simulating many nodes on one
asyncio loop; everything is on loopback. Simplifications, said plainly: the simulated nodes'
registration is done inside the coordinator process (no 10,000 Connect streams), and in the hyrun
runs the node -> relay hop is in-process (a relay and its nodes share a generator, and each round's
batch is copied from a template the relay's own build_batch made once per group), so what is
measured is the relay -> coordinator path and the coordinator.

    python benchmarks/coordinator_scale.py [--nodes 100,1000,10000] [--duration-s 10] [--fan-in 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc

CARDS = 8
NAIVE_METHOD = "/hyrun.bench.Naive/Beat"
UNARY_NODES_PER_GENERATOR = 2500
RELAY_NODES_PER_GENERATOR = 10_000  # one process: a dead relay's nodes may move to any relay it hosts
MAX_GENERATORS = 4


def node_name(i: int) -> str:
    return f"node-{i:05d}"


def card_templates(i: int) -> list[pb.CardTelemetry]:
    return [pb.CardTelemetry(index=c, temperature_c=40.0 + (i * 7 + c) % 45, slowdown_temperature_c=90.0, power_w=400.0,
                             utilization=0.9, memory_used_bytes=60 << 30) for c in range(CARDS)]  # fmt: skip


# ------------------------------------------------------------------------------ the coordinator side


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Probe:
    """What the parent asks the coordinator process for, over stdin/stdout (one JSON line each)."""

    def __init__(self, call, arrays, delays, lost_at: dict) -> None:
        self.call, self.arrays, self.delays, self.lost_at = call, arrays, delays, lost_at
        self.window: dict = {}

    def serve(self) -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "reset":
                self.call(lambda: self.delays.counts.fill(0))
                self.window = {"cpu0": _cpu_s(), "wall0": time.monotonic()}
            elif command == "stop":
                counts = self.call(lambda: self.delays.counts.copy())
                self.window.update(cpu1=_cpu_s(), wall1=time.monotonic(), counts=counts)
            elif command == "report":
                a = self.arrays
                received = self.call(lambda: int(a.beats[: len(a.node_names)].sum()))
                self.delays.counts[:] = self.window["counts"]
                w = self.window
                print(json.dumps({
                    "p50_s": self.delays.quantile(0.5), "p99_s": self.delays.quantile(0.99), "received": received,
                    "cpu_share": (w["cpu1"] - w["cpu0"]) / (w["wall1"] - w["wall0"]), "lost_at": self.lost_at,
                }), flush=True)  # fmt: skip
                return


def run_coordinator(args) -> None:
    from hyrun.runtime.coordinator.actions import MarkNodeLost
    from hyrun.runtime.coordinator.membership import CardRecord, NodeRecord

    names = [node_name(i) for i in range(args.count)]
    cards = tuple(CardRecord(c, "H100", 80 << 30, 1.0, True) for c in range(CARDS))
    if args.mode == "unary":
        address, call, arrays, delays, membership = _naive_server(args)
    else:
        from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings

        service = CoordinatorService(
            CoordinatorSettings(heartbeat_interval_s=1.0, heartbeat_timeout_s=args.timeout_s, metrics_port=None,
                                run_root=tempfile.mkdtemp(prefix="hyrun-scale-"), relay_fan_in=args.fan_in),
            open_rendezvous=None,
        )  # fmt: skip
        service.start()
        address, call = service.address, service.call
        arrays, delays, membership = service.metrics.cards_health.arrays, service.servicer.relays.delays, service.servicer.membership
    lost_at: dict[str, float] = {}
    if args.mode == "relay":
        orch = service.servicer.orchestrator
        apply = orch.apply

        def recording_apply(action, now_s):
            if isinstance(action, MarkNodeLost):
                lost_at[action.node] = now_s
            return apply(action, now_s)

        orch.apply = recording_apply

    def register_all() -> None:
        now = time.monotonic()
        for name in names:
            membership.register(NodeRecord(name, "127.0.0.1", cards, 0, last_heartbeat_s=now, registered_s=now))
            arrays.register(name, [(c.index, c.type, c.memory_bytes) for c in cards])

    call(register_all)
    print(f"ready {address}", flush=True)
    Probe(call, arrays, delays, lost_at).serve()


def _naive_server(args):
    """The baseline: a grpc.aio server with one unary call per heartbeat, writing into the same arrays."""
    from hyrun.runtime.card_metrics import CardCollector
    from hyrun.runtime.coordinator.card_arrays import DelayHistogram
    from hyrun.runtime.coordinator.membership import Membership

    cards, delays, membership = CardCollector(), DelayHistogram(), Membership()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = []

    async def beat(request: pb.NodeBeat, context) -> pb.BeatAck:
        now = time.monotonic()
        hb = request.heartbeat
        cards.ingest(request.node, hb.cards, now, hb.sequence)
        membership.heartbeat(request.node, now)
        delays.add(np.array([time.time() - request.sent_unix_s]))
        return pb.BeatAck(sequence=hb.sequence)

    async def serve() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(beat, request_deserializer=pb.NodeBeat.FromString,
                                                      response_serializer=pb.BeatAck.SerializeToString)  # fmt: skip
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("hyrun.bench.Naive", {"Beat": handler})])
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await server.wait_for_termination()

    threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True).start()
    ready.wait()

    def call(fn):
        return asyncio.run_coroutine_threadsafe(_run(fn), loop).result(30)

    return f"127.0.0.1:{port[0]}", call, cards.arrays, delays, membership


async def _run(fn):
    return fn()


# ------------------------------------------------------------------------------ load generators


async def generate_unary(args) -> dict:
    """Each node sends its beat as one call at its own phase of the second; a node whose previous call
    has not returned skips the beat (a blocked agent thread would) and that beat counts as lost."""
    channel = grpc.aio.insecure_channel(args.target)
    send = channel.unary_unary(NAIVE_METHOD, request_serializer=pb.NodeBeat.SerializeToString,
                               response_deserializer=pb.BeatAck.FromString)  # fmt: skip
    ids = range(args.first, args.first + args.count)
    templates = {i: card_templates(i) for i in ids}
    busy: set[int] = set()
    stats = {"sent": 0, "skipped": 0, "failed": 0}
    end = args.start_at + args.run_s

    async def one(i: int, seq: int) -> None:
        busy.add(i)
        try:
            beat = pb.NodeBeat(node=node_name(i), sent_unix_s=time.time(), heartbeat=pb.Heartbeat(sequence=seq, cards=templates[i]))
            await send(beat, timeout=args.timeout_s)
        except grpc.aio.AioRpcError:
            stats["failed"] += 1
        finally:
            busy.discard(i)

    tasks = set()
    seq = 0
    while (round_start := args.start_at + seq) < end:
        seq += 1
        for i in ids:
            due = round_start + i / args.total
            if (wait := due - time.time()) > 0.002:
                await asyncio.sleep(wait)
            if i in busy:
                stats["skipped"] += 1
                continue
            stats["sent"] += 1
            task = asyncio.create_task(one(i, seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await asyncio.wait(tasks, timeout=args.timeout_s + 1) if tasks else None
    await channel.close()
    return stats


async def generate_relayed(args) -> dict:
    """Relays of --group nodes each; a relay's nodes beat together at the relay's phase (agents align
    their beats to the interval), so each round is one batch. Optional faults: --silence-at (one
    node stops), --kill-relay-at (one relay's stream is cut; its nodes re-route through Route)."""
    from hyrun.agent.relay import Relay, build_batch

    ids = list(range(args.first, args.first + args.count))
    groups = [ids[k : k + args.group] for k in range(0, len(ids), args.group)]
    relays = {f"relay-{g[0]:05d}": Relay(node=f"relay-{g[0]:05d}", coordinator=args.target, address=f"inproc-{g[0]}")
              for g in groups}  # fmt: skip
    for relay in relays.values():
        await relay.start()
    via = {i: f"relay-{g[0]:05d}" for g in groups for i in g}  # node -> relay name ("" : its Connect stream)
    members = {f"relay-{g[0]:05d}": list(g) for g in groups}  # relay -> the nodes that beat at its phase
    templates = {i: card_templates(i) for i in ids}
    stats = {"sent": 0, "acked": 0, "rerouted_to_relay": 0, "fell_back_direct": 0}
    # On different relays: a relay's death restarts its nodes' lease, which would hide the silence.
    killed = sorted(relays)[len(relays) // 3] if args.kill_relay_at else ""
    silenced = node_name(groups[2 * len(groups) // 3][-1]) if args.silence_at else ""
    killed_nodes = [i for i in ids if via[i] == killed]
    direct: dict[int, asyncio.Queue] = {}
    channel = grpc.aio.insecure_channel(args.target)
    stub = pb_grpc.CoordinatorStub(channel)
    end = args.start_at + args.run_s

    def ack(_sequence: int) -> None:
        stats["acked"] += 1

    async def reroute(i: int, failed: str) -> None:
        reply = await stub.Route(pb.RouteRequest(node=node_name(i), failed_relay=failed), timeout=args.timeout_s)
        if reply.relay in relays and reply.relay != killed:
            via[i] = reply.relay
            members[reply.relay].append(i)  # it beats with its new relay's group from the next round on
            stats["rerouted_to_relay"] += 1
        else:
            via[i] = ""
            stats["fell_back_direct"] += 1
            direct[i] = queue = asyncio.Queue()
            asyncio.create_task(_connect(stub, i, queue))

    async def rounds(relay_name: str, phase: float) -> None:
        seq = 0
        while (t := args.start_at + seq + phase) < end:
            seq += 1
            if (wait := t - time.time()) > 0:
                await asyncio.sleep(wait)
            if killed and time.time() >= args.start_at + args.kill_relay_at and relays[killed].running:
                await relays[killed].stop()  # the relay dies: its stream to the coordinator is cut
                stats["killed_at_unix"] = time.time()
            nodes = list(members[relay_name])
            if relay_name == killed and "killed_at_unix" in stats:
                members[relay_name].clear()
            relayed = []
            for i in nodes:
                name = node_name(i)
                if name == silenced and time.time() >= args.start_at + args.silence_at:
                    stats.setdefault("silenced", {"node": name, "last_beat_mono": marks["last_beat_mono"]})
                    continue
                if via[i] == killed and "killed_at_unix" in stats:
                    await reroute(i, killed)  # in an agent: its stream to the relay broke (HeartbeatRoute)
                    if via[i]:
                        continue  # from now on it beats at its new relay's phase
                stats["sent"] += 1
                if via[i] == relay_name:
                    relayed.append(i)
                elif not via[i]:
                    direct[i].put_nowait(pb.Heartbeat(sequence=seq, cards=templates[i]))
                if name == silenced:
                    marks["last_beat_mono"] = time.monotonic()
            if relayed:
                relays[relay_name].forward(round_batch(relay_name, relayed, seq), [(ack, seq)] * len(relayed))

    def round_batch(relay_name: str, nodes: list[int], seq: int) -> pb.RelayBatch:
        """The relay's batch of this round: its nodes' cards from a template built once per group
        (with the relay's own build_batch), their sequences and send times set."""
        key = (relay_name, tuple(nodes))
        if key not in batch_templates:
            beats = [pb.NodeBeat(node=node_name(i), heartbeat=pb.Heartbeat(cards=templates[i])) for i in nodes]
            batch_templates[key] = build_batch(relay_name, relays[relay_name].address, 0, beats)
        batch = pb.RelayBatch()
        batch.CopyFrom(batch_templates[key])
        batch.sequences[:] = [seq] * len(nodes)
        batch.sent_unix_s[:] = [time.time()] * len(nodes)
        return batch

    batch_templates: dict = {}
    marks = {"last_beat_mono": math.nan}
    await asyncio.gather(*(rounds(r, k / len(groups)) for k, r in enumerate(relays)))
    await asyncio.sleep(1.0)  # the last batches' replies
    stats["killed_nodes"] = len(killed_nodes)
    return stats


async def _connect(stub, i: int, beats: asyncio.Queue) -> None:
    """A node's own Connect stream (its fallback): registers, then sends its heartbeats."""
    register = pb.Register(node=node_name(i), cards=[pb.CardInfo(index=c, type="H100", memory_bytes=80 << 30) for c in range(CARDS)])

    async def messages():
        yield pb.AgentMessage(register=register)
        while True:
            yield pb.AgentMessage(heartbeat=await beats.get())

    try:
        async for _command in stub.Connect(messages()):
            pass
    except grpc.aio.AioRpcError:
        pass


def run_generator(args) -> None:
    stats = asyncio.run(generate_relayed(args) if args.mode == "relay" else generate_unary(args))
    print(json.dumps(stats), flush=True)


# ------------------------------------------------------------------------------ the run


LOG = tempfile.NamedTemporaryFile(prefix="coordinator_scale-", suffix=".log", delete=False)


def _child(*argv: str) -> subprocess.Popen:
    """A coordinator or generator process; their logs go to one file (named at the end)."""
    return subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=LOG, text=True, start_new_session=True)  # fmt: skip


def measure(mode: str, nodes: int, args, faults: bool) -> dict:
    common = ["--mode", mode, "--timeout-s", str(args.timeout_s), "--fan-in", str(args.fan_in)]
    coordinator = _child("--role", "coordinator", "--count", str(nodes), *common)
    procs = [coordinator]
    try:
        ready = coordinator.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"the coordinator did not start ({mode}, {nodes} nodes)")
        per = UNARY_NODES_PER_GENERATOR if mode == "unary" else RELAY_NODES_PER_GENERATOR
        per = max(per, math.ceil(nodes / MAX_GENERATORS))
        start_at = time.time() + 3.0  # generators' imports and connections
        run_s = args.warmup_s + args.duration_s
        for first in range(0, nodes, per):
            extra = ["--silence-at", str(args.warmup_s + 1), "--kill-relay-at", str(args.warmup_s + 2)] if faults else []
            procs.append(_child("--role", "generator", "--target", ready[1], "--first", str(first),
                                "--count", str(min(per, nodes - first)), "--total", str(nodes), "--start-at", str(start_at),
                                "--run-s", str(run_s), "--group", str(args.group), *common, *extra))  # fmt: skip
        time.sleep(max(0.0, start_at + args.warmup_s - time.time()))
        coordinator.stdin.write("reset\n")
        coordinator.stdin.flush()
        time.sleep(max(0.0, start_at + run_s - time.time()))
        coordinator.stdin.write("stop\n")
        coordinator.stdin.flush()
        generated = [json.loads(p.communicate(timeout=args.timeout_s + 30)[0].splitlines()[-1]) for p in procs[1:]]
        coordinator.stdin.write("report\n")
        coordinator.stdin.flush()
        report = json.loads(coordinator.stdout.readline())
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    sent = sum(g["sent"] for g in generated)
    skipped = sum(g.get("skipped", 0) for g in generated)
    result = {"mode": mode, "nodes": nodes, "p50_s": report["p50_s"], "p99_s": report["p99_s"],
              "lost": sent + skipped - report["received"], "beats": sent + skipped, "cpu_share": report["cpu_share"]}  # fmt: skip
    if faults:
        g = generated[0]
        silenced = g.get("silenced", {})
        lost_at = dict(report["lost_at"])
        evicted_s = lost_at.pop(silenced.get("node"), math.nan) - silenced.get("last_beat_mono", math.nan)
        result.update(silent_to_lost_s=evicted_s, false_lost=sorted(lost_at), killed_nodes=g["killed_nodes"],
                      rerouted=g["rerouted_to_relay"], direct=g["fell_back_direct"])  # fmt: skip
    return result


def _ms(s: float) -> str:
    return f"{s * 1000:.1f}" if not math.isnan(s) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="100,1000,10000", help="comma-separated node counts (8 cards each)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per run (after the warm-up)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds of beats before measuring")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="the coordinator's heartbeat timeout")
    parser.add_argument("--fan-in", type=int, default=100, help="most nodes one relay carries")
    parser.add_argument("--group", type=int, default=90, help="nodes per relay in the generator (below --fan-in: "
                                                              "a dead relay's nodes find room on another)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-call-per-heartbeat baseline")
    parser.add_argument("--role", choices=("main", "coordinator", "generator"), default="main", help=argparse.SUPPRESS)
    for hidden in ("--mode", "--target"):
        parser.add_argument(hidden, default="", help=argparse.SUPPRESS)
    for hidden in ("--first", "--count", "--total"):
        parser.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    for hidden in ("--start-at", "--run-s", "--silence-at", "--kill-relay-at"):
        parser.add_argument(hidden, type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "coordinator":
        run_coordinator(args)
        return 0
    if args.role == "generator":
        run_generator(args)
        return 0
    if args.duration_s < args.timeout_s + 4:
        parser.error(f"--duration-s must be at least --timeout-s + 4 ({args.timeout_s + 4}): the silent node must be seen lost")
    sizes = [int(n) for n in args.nodes.split(",")]
    print(f"{'nodes':>6} {'server':>9} {'p50 ms':>8} {'p99 ms':>8} {'beats':>8} {'lost':>6} {'coord CPU':>9}")
    results = {}
    for n in sizes:
        for mode in ([] if args.no_baseline else ["unary"]) + ["relay"]:
            r = results[(mode, n)] = measure(mode, n, args, faults=(mode == "relay" and n == max(sizes)))
            label = "baseline" if mode == "unary" else "hyrun"
            print(f"{n:>6} {label:>9} {_ms(r['p50_s']):>8} {_ms(r['p99_s']):>8} {r['beats']:>8} {r['lost']:>6} "
                  f"{r['cpu_share']:>8.0%}", flush=True)  # fmt: skip
    big = results[("relay", max(sizes))]
    print(f"\nsilent node among {max(sizes)}: marked lost {big['silent_to_lost_s']:.2f} s after its last beat "
          f"(goal <= {args.timeout_s + 1:.1f} s)")
    print(f"relay killed mid-run: {big['killed_nodes']} nodes re-routed ({big['rerouted']} to another relay, "
          f"{big['direct']} to the coordinator directly); nodes falsely marked lost: {len(big['false_lost'])}")
    if not args.no_baseline:
        for n in sizes:
            b, h = results[("unary", n)], results[("relay", n)]
            print(f"{n:>6} nodes: p99 {b['p99_s'] / h['p99_s']:.1f}x lower, coordinator CPU "
                  f"{b['cpu_share'] / max(h['cpu_share'], 1e-9):.1f}x lower, lost {b['lost']} -> {h['lost']} (baseline -> hyrun)")
    ok = big["p99_s"] <= 0.050 and big["lost"] <= 0 and big["cpu_share"] < 1.0 and not big["false_lost"] \
        and big["silent_to_lost_s"] <= args.timeout_s + 1  # fmt: skip
    print(f"(logs of the coordinator and generator processes: {LOG.name})")
    print(f"\ngoal at {max(sizes)} nodes (p99 <= 50 ms, none lost, coordinator under one core, silent node "
          f"lost in time, no false loss): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
