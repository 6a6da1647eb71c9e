"""The `hyrun` command line. Each command is a thin shell over a module that does the work; user
errors (a bad job file, an unreachable coordinator) print one actionable message and exit non-zero
without a traceback."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from hyrun.agent.cli import agent as agent_command
from hyrun.common.env import TOKEN_ENV

app = typer.Typer(
    help="hyrun: keep a Mixture-of-Experts job training on mixed, failing GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rendering it with rich costs a third of a second per call
)
console = Console()
# Captured output (a pipe, a file, a CI log) has no width: rich would wrap at 80 columns, mid-cell.
console.soft_wrap = not console.is_terminal
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TokenFile = Annotated[
    Optional[Path], typer.Option(help=f"file holding the job token (default: ${TOKEN_ENV})", exists=True, dir_okay=False)
]
TlsCa = Annotated[Optional[Path], typer.Option(help="PEM certificate to trust: enables TLS to the coordinator", exists=True)]


def _token(token_file: Path | None) -> str:
    return token_file.read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "")


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def launch(
    job_file: Annotated[Path, typer.Argument(help="the job's YAML file")],
    coordinator: Annotated[
        Optional[str], typer.Option(help="HOST:PORT of a running coordinator (several, comma-separated: a leader and its standbys); default: start an embedded cluster here")
    ] = None,
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="live view (default: on a terminal)")] = None,
    netns: Annotated[bool, typer.Option("--netns", help="embedded cluster only: every node in its own network namespace "
                                        "(data and control networks, TLS), so network faults can be injected; needs root")] = False,
) -> None:
    """Train a job: by default on an embedded cluster of this machine (coordinator + one agent per node of the job file)."""
    from hyrun.common.security import TlsFiles
    from hyrun.runtime.coordinator.planning import check_job
    from hyrun.runtime.jobfile import JobFileError, load_job
    from hyrun.runtime.launch import run_job
    from hyrun.runtime.progress import ProgressView

    from hyrun.runtime.export.index import InitFromError, check_init_from
    from hyrun.runtime.data.sources import DataError

    try:
        job = load_job(job_file)
        check_job(job)
        if job.model.init_from:
            check_init_from(job.model.config(), Path(job.model.init_from), training_state=job.model.init_training_state)
        _check_fault_modes(job, netns, coordinator)
        if job.data is not None:
            _prepare_data(job)
    except (JobFileError, InitFromError, DataError) as error:
        _fail(str(error), EXIT_USAGE)
    live = console.is_terminal if progress is None else progress

    evaluation = []
    if job.data is not None and job.checkpoint.enabled:
        # torch loads while the job trains (the launcher mostly waits), not after it, for the final evaluation.
        import importlib
        import threading

        threading.Thread(target=importlib.import_module, args=("hyrun.runtime.eval.heldout",), daemon=True).start()

    def started(address: str, run_dir: Path) -> None:
        console.print(f"[bold]{job.name}[/]: {job.cluster.card_count} cards on {len(job.cluster.nodes)} nodes, "
                      f"coordinator {address}, logs in {run_dir}")
        if job.data is not None and job.data.validation.every_checkpoint and job.checkpoint.enabled:
            evaluation.append(_start_evaluation(run_dir, job_file, _eval_target(address, run_dir, token_file, tls_ca)))

    view = ProgressView(console, live)
    try:
        with view:
            outcome = run_job(
                job, job_file.read_text(), coordinator=coordinator, token=_token(token_file),
                tls=TlsFiles(cert=tls_ca), on_event=view.update, on_started=started, netns=netns,
            )  # fmt: skip
    except KeyboardInterrupt:
        err_console.print("interrupted: every process this launch started has been stopped")
        raise typer.Exit(EXIT_INTERRUPTED)
    for process in evaluation:
        _stop_evaluation(process)
    _print_summary(outcome)
    if not outcome.succeeded:
        _fail(f"job {outcome.job_id} failed: {outcome.message}")
    if job.data is not None and job.checkpoint.enabled:
        _print_heldout(job, outcome.run_dir)


def _prepare_data(job) -> None:
    """The job's corpus, prepared on first use (a cached one is only re-hashed), its vocabulary checked."""
    from hyrun.runtime.data.first_use import check_vocabulary, ensure_prepared

    directory = ensure_prepared(job.data, say=lambda text: err_console.print(text, highlight=False))
    check_vocabulary(directory, job.model.config().vocab_size)


def _eval_target(address: str, run_dir: Path, token_file: Path | None, tls_ca: Path | None):
    """Where the evaluation reports: the job's coordinator, with the launcher's token and CA (an embedded
    cluster's token and, under --netns, its certificate are in the run directory)."""
    from hyrun.common.security import TlsFiles
    from hyrun.runtime.eval.report import CoordinatorTarget

    token = _token(token_file) or ((run_dir / "token").read_text().strip() if (run_dir / "token").is_file() else "")
    embedded_cert = run_dir / "tls" / "cert.pem"
    ca = tls_ca or (embedded_cert if embedded_cert.is_file() else None)
    return CoordinatorTarget(address, run_dir.name, token, TlsFiles(cert=ca))


def _start_evaluation(run_dir: Path, job_file: Path, target):
    """The evaluation beside training: its own process group, so nothing it does reaches the job."""
    import subprocess
    import sys

    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "eval.log", "a")
    return subprocess.Popen([sys.executable, "-m", "hyrun.runtime.eval.watch", str(run_dir), str(job_file.resolve()),
                             str(os.getpid())], env=dict(os.environ, **target.environment()),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_evaluation(process, grace_s: float = 30.0) -> None:
    """It ends by itself once summary.json is written and the last checkpoint scored; then it is stopped."""
    import signal
    import subprocess

    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _print_heldout(job, run_dir: Path) -> None:
    """Held-out loss of the final checkpoint beside a unigram model's, also added to summary.json."""
    from rich.table import Table

    from hyrun.runtime.eval.heldout import evaluate_run

    try:
        result = evaluate_run(job, run_dir)
    except Exception as error:  # an evaluation that fails is reported; the job itself succeeded
        err_console.print(f"[yellow]held-out evaluation failed:[/] {type(error).__name__}: {error}", highlight=False)
        return
    table = Table(title=f"held-out loss at step {result['step']} (nats/token, seq_len {result['seq_len']})")
    for column in ("source", "tokens", "model", "unigram", "perplexity"):
        table.add_column(column)
    rows = [*result["sources"].items(), ("all", result)]
    for name, r in rows:
        table.add_row(name, f"{r['tokens']:,}", f"{r['model_loss']:.3f}", f"{r['unigram_loss']:.3f}",
                      f"{math.exp(r['model_loss']):.1f}")
    console.print(table)
    summary = run_dir / "summary.json"
    if summary.is_file():
        summary.write_text(json.dumps(json.loads(summary.read_text()) | {"heldout": result}, indent=2))


def _check_fault_modes(job, netns: bool, coordinator: str | None) -> None:
    """Faults the launcher injects need what it sets up: network hosts, a disk, a store."""
    from hyrun.runtime.jobfile import JobFileError
    from hyrun.runtime.network.hosts import unavailable_reason
    from hyrun.runtime.storage_faults import unavailable

    if storage_reason := unavailable(job, embedded=coordinator is None):
        raise JobFileError(storage_reason)

    network_faults = [f"{f.kind} on {f.node}" for f in job.faults if f.is_network]
    if netns and coordinator is not None:
        raise JobFileError("--netns builds an embedded cluster; it cannot be used with --coordinator")
    if network_faults and not netns:
        raise JobFileError(f"network faults ({', '.join(network_faults)}) need separate network hosts: add --netns")
    if netns and unavailable_reason():
        raise JobFileError(f"--netns: {unavailable_reason()}")


def _print_summary(outcome) -> None:
    losses = [outcome.losses[k] for k in sorted(outcome.losses)]
    tps = sorted(outcome.tokens_per_s)
    lines = [
        f"job {outcome.job_id}: {outcome.state.lower()} in {outcome.wall_time_s:.1f} s",
        f"  steps {len(losses)}, generations {outcome.generations}, steps trained again {outcome.steps_lost}",
    ]
    lines += [f"  evicted {eviction}" for eviction in outcome.evictions]
    if losses:
        lines.append(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if tps:
        lines.append(f"  median throughput {tps[len(tps) // 2]:,.0f} tokens/s")
    lines.append(f"  logs: {outcome.run_dir}")
    console.print("\n".join(lines), highlight=False)


@app.command()
def plan(
    job_file: Annotated[Path, typer.Argument(help="the job's YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print the plans as JSON")] = False,
    data_parallel_only: Annotated[bool, typer.Option(help="search data-parallel plans only")] = False,
) -> None:
    """Print the plan the cost model picks for the job's cards, next to the naive uniform plan."""
    from hyrun.planner import format_comparison, result_to_json
    from hyrun.runtime.coordinator.planning import check_job, plan_job
    from hyrun.runtime.jobfile import JobFileError, load_job

    try:
        job = load_job(job_file)
        check_job(job)
        result = plan_job(job, data_parallel_only=data_parallel_only)
    except JobFileError as error:
        _fail(str(error), EXIT_USAGE)
    except ValueError as error:  # only --data-parallel-only can get here: check_job planned without it
        _fail(f"no data-parallel plan fits: {error}", EXIT_USAGE)
    if as_json:
        print(json.dumps(result_to_json(result), indent=2))
    else:
        console.print(format_comparison(result), highlight=False, markup=False)


@app.command("coordinator")
def coordinator_cmd(
    host: Annotated[str, typer.Option(help="address to listen on (loopback unless told otherwise)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port")] = 50051,
    advertise_host: Annotated[Optional[str], typer.Option(help="address workers dial for rendezvous (default: --host)")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port")] = 9400,
    heartbeat_interval: Annotated[float, typer.Option(help="seconds between agent heartbeats")] = 1.0,
    heartbeat_timeout: Annotated[float, typer.Option(help="seconds without a heartbeat before a node is lost")] = 5.0,
    run_root: Annotated[Path, typer.Option(help="where job logs go")] = Path("runs"),
    store: Annotated[str, typer.Option(help="job state store: 'memory' (a restart loses running jobs) or "
                                       "'etcd://HOST:PORT' (a restarted or standby coordinator carries them on)")] = "memory",
    standby: Annotated[bool, typer.Option(help="etcd store: if another coordinator leads, wait and take over "
                                          "when it goes (without this, give up after one lease)")] = False,
    lease_ttl: Annotated[int, typer.Option(min=2, help="etcd store: seconds a dead leader's lease outlives it, "
                                           "i.e. how soon a standby takes over")] = 5,
    token_file: TokenFile = None,
    tls_cert: Annotated[Optional[Path], typer.Option(exists=True, help="PEM certificate (enables TLS)")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(exists=True, help="PEM private key")] = None,
) -> None:
    """Run a coordinator for a multi-host cluster (agents connect with `hyrun agent`).

    With an etcd store, run two or more (`--standby` on the others): one leads, the others wait,
    and whichever takes over carries the running job on; give agents and `hyrun launch` every
    coordinator's address, comma-separated."""
    import signal
    import threading

    from hyrun.common.security import TlsFiles
    from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings
    from hyrun.runtime.rendezvous import GenerationStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = _token(token_file)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        _fail(f"listening on {host} needs a job token (--token-file or ${TOKEN_ENV})", EXIT_USAGE)
    try:
        settings = CoordinatorSettings(
            host=host, port=port, advertise_host=advertise_host or host,
            heartbeat_interval_s=heartbeat_interval, heartbeat_timeout_s=heartbeat_timeout,
            token=token, tls=TlsFiles(cert=tls_cert, key=tls_key),
            metrics_host=host, metrics_port=metrics_port, run_root=str(run_root), store_url=store,
            standby=standby, lease_ttl_s=lease_ttl,
        )  # fmt: skip
        service = CoordinatorService(settings, open_rendezvous=GenerationStore)
    except (ValueError, OSError) as error:
        _fail(str(error), EXIT_USAGE)
    # The handlers only set a flag: nothing is raised into grpc or the loop thread mid-call.
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # may be inherited ignored
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (stop.wait(), service.stop()), daemon=True).start()  # also while standing by
    try:
        service.start()
    except InterruptedError:
        return
    except (ValueError, OSError) as error:
        _fail(str(error), EXIT_USAGE)
    console.print(f"coordinator on {service.address}, metrics on :{service.metrics_port}")
    try:
        while not stop.wait(0.5) and not service.ended.is_set():
            pass
    finally:
        service.stop()
    if service.deposed:
        _fail(f"stopped leading: {service.deposed}", 3)


# The agent's command lives with the agent; this module only composes the CLI.
app.command("agent")(agent_command)


def _connect(coordinator: str | None, run: Path | None, token_file: Path | None, tls_ca: Path | None):
    """(stub, metadata, channel) for a coordinator named by address or by an embedded run's directory."""
    from hyrun.proto import hyrun_pb2_grpc as pb_grpc
    from hyrun.common.security import TlsFiles, call_metadata, open_channel

    token = _token(token_file)
    if run is not None:
        try:
            coordinator = json.loads((run / "coordinator.json").read_text())["address"]
            token = token or (run / "token").read_text().strip()
        except OSError as error:
            _fail(f"{run} is not a run directory of an embedded launch: {error}", EXIT_USAGE)
    if coordinator is None:
        _fail("say which coordinator: --coordinator HOST:PORT or --run runs/JOB", EXIT_USAGE)
    channel = open_channel(coordinator, TlsFiles(cert=tls_ca))
    return pb_grpc.CoordinatorStub(channel), call_metadata(token), channel


def _call(coordinator, run, token_file, tls_ca, method: str, request, *, timeout_s: float):
    """One unary call to the coordinator (the first of several comma-separated ones that answers: a
    leader and its standbys, which do not listen); an unreachable or refusing one is a user-facing error."""
    import grpc

    addresses = [a.strip() for a in coordinator.split(",")] if coordinator and run is None else [coordinator]
    for number, address in enumerate(addresses):
        stub, metadata, channel = _connect(address, run, token_file, tls_ca)
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE and number + 1 < len(addresses):
                continue  # a standby (it does not listen) or a dead leader: try the next
            if run is not None and error.code() == grpc.StatusCode.UNAVAILABLE:
                _fail(f"the coordinator of {run} does not answer and the run has no summary.json: its launch "
                      f"was stopped without finishing (killed?); logs in {run}")
            _fail(f"coordinator: {error.details() or error.code().name}")
        finally:
            channel.close()


CoordinatorOpt = Annotated[Optional[str], typer.Option(help="HOST:PORT of the coordinator (several, comma-separated: the one leading answers)")]
RunOpt = Annotated[Optional[Path], typer.Option(help="a run directory of an embedded launch (runs/JOB)")]


@app.command()
def status(coordinator: CoordinatorOpt = None, run: RunOpt = None, token_file: TokenFile = None, tls_ca: TlsCa = None) -> None:
    """Show a running job: nodes and their health, generation, step, loss, throughput, evictions."""
    from hyrun.proto import hyrun_pb2 as pb
    from hyrun.runtime.run_dir import ended_job_lines

    ended = ended_job_lines(run) if run is not None and coordinator is None else None
    if ended is not None:  # the launch wrote its summary and stopped its coordinator
        console.print("\n".join(ended), highlight=False, markup=False)
        return
    reply = _call(coordinator, run, token_file, tls_ca, "Status", pb.StatusRequest(), timeout_s=5)
    for job in reply.jobs:
        console.print(
            f"job {job.job_id}: {job.state} generation {job.generation} step {job.step}/{job.total_steps} "
            f"loss {job.loss:.4f} {job.tokens_per_s:,.0f} tok/s, steps trained again {job.steps_lost} {job.message}",
            highlight=False,
        )
        if job.layout:
            console.print(f"  layout {job.layout}", highlight=False)
        for eviction in job.evictions:
            console.print(f"  evicted {eviction}", highlight=False)
        for rank in job.ranks:
            console.print(
                f"  rank {rank.rank}: {rank.node}/card{rank.card_index} {rank.micro_batches} micro-batches, "
                f"step {rank.step}, compute {rank.compute_time_s * 1e3:.0f} ms, comm wait {rank.comm_wait_s * 1e3:.0f} ms, "
                f"bubble {rank.bubble_s * 1e3:.0f} ms of {rank.step_time_s * 1e3:.0f} ms",
                highlight=False,
            )
    for node in reply.nodes:
        console.print(f"  node {node.node}: {node.state} ({node.cards} cards)", highlight=False)


@app.command()
def drain(
    node: Annotated[str, typer.Argument(help="the node to take out of the job")],
    reason: Annotated[str, typer.Option(help="why (shown in status and logs)")] = "",
    coordinator: CoordinatorOpt = None,
    run: RunOpt = None,
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
) -> None:
    """Take a node out of the running job without losing work: checkpoint, then continue without it."""
    from hyrun.proto import hyrun_pb2 as pb

    reply = _call(coordinator, run, token_file, tls_ca, "Drain", pb.DrainRequest(node=node, reason=reason), timeout_s=10)
    console.print(reply.message, highlight=False)


@app.command()
def readmit(
    node: Annotated[str, typer.Argument(help="the node whose cards come back")],
    card: Annotated[list[int] | None, typer.Option("--card", help="a card index on the node (repeat for more); "
                                                   "default: all of its cards")] = None,
    reason: Annotated[str, typer.Option(help="why (shown in status and logs)")] = "",
    coordinator: CoordinatorOpt = None,
    run: RunOpt = None,
    token_file: TokenFile = None,
    tls_ca: TlsCa = None,
) -> None:
    """Give a node's quarantined cards back to the running job (repaired, replaced, lent again): their
    quarantine ends and they join at the next checkpoint."""
    from hyrun.proto import hyrun_pb2 as pb

    request = pb.ReadmitRequest(node=node, cards=card or [], reason=reason)
    reply = _call(coordinator, run, token_file, tls_ca, "Readmit", request, timeout_s=10)
    console.print(reply.message, highlight=False)


def _mount_ckpt() -> None:
    from hyrun.runtime.checkpoint.cli import app as ckpt_app

    app.add_typer(ckpt_app, name="ckpt", help="List and verify committed checkpoints.")


_mount_ckpt()


def _mount_export() -> None:
    from hyrun.runtime.export.cli import export

    app.command("export")(export)


_mount_export()


def _mount_data() -> None:
    from hyrun.runtime.data.cli import app as data_app

    app.add_typer(data_app, name="data", help="Prepare real training data (token shards, tokenizer, manifest).")


_mount_data()

def _mount_chaos() -> None:
    from hyrun.runtime.chaos_cli import app as chaos_app

    app.add_typer(chaos_app, name="chaos")


_mount_chaos()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
