"""`hyrun chaos run`: the command-line shell over `chaos.run_scenario` and `chaos_report`. Each trial
is an embedded launch under a deadline: past it, the launch is interrupted (its cleanup stops every
process it started) and the trial counts as FAILED, saying so."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Fault injection: run a job under scripted faults and report what each cost.", no_args_is_help=True,
                  rich_markup_mode=None)
console = Console()
console.soft_wrap = not console.is_terminal
err_console = Console(stderr=True)
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class TrialTimeout(Exception):
    pass


def _on_alarm(signum, frame) -> None:
    raise TrialTimeout()


def _run_with_deadline(spec, timeout_s: float):
    """One embedded launch; past `timeout_s` it is stopped and returned as FAILED with the reason."""
    from hyrun.common.security import TlsFiles
    from hyrun.runtime.launch import JobOutcome, run_job

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return run_job(spec, spec.model_dump_json(), coordinator=None, token="", tls=TlsFiles(), on_event=lambda e: None)
    except TrialTimeout:
        return JobOutcome("", "FAILED", f"still running after {timeout_s:.0f} s: stopped (the trial deadline)",
                          Path(spec.runtime.run_dir), timeout_s)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@app.command("run")
def chaos_run(
    scenario_file: Annotated[Path, typer.Argument(help="the scenario's YAML file (a job file plus faults)")],
    compare: Annotated[Optional[bool], typer.Option("--compare/--no-compare", help="also run fault-free (default: the scenario's)")] = None,
    repeat: Annotated[Optional[int], typer.Option(min=1, help="trials, each a fresh job (default: the scenario's)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the scenario's random steps and targets (default: the scenario's)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the report here as JSON")] = None,
    report: Annotated[Optional[Path], typer.Option(help="write report.json, report.md and report.html (with plots) into this directory")] = None,
) -> None:
    """Run a job while injecting the scenario's faults, N times; report per trial and per fault kind
    whether it was survived, detection and recovery time, and lost steps. Exit 1 unless every trial
    did what the scenario expects."""
    from hyrun.runtime.chaos import load_scenario, run_scenario
    from hyrun.runtime.chaos_report import report_dict, write_report
    from hyrun.runtime.jobfile import JobFileError

    try:
        scenario, job = load_scenario(scenario_file)
    except JobFileError as error:
        err_console.print(f"error: {error}", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    overrides = {k: v for k, v in (("compare", compare), ("repeat", repeat), ("seed", seed)) if v is not None}
    scenario = scenario.model_copy(update=overrides)
    try:
        run = run_scenario(scenario, job, run=lambda spec: _run_with_deadline(spec, scenario.trial_timeout_s),
                           say=lambda text: console.print(text, highlight=False))  # fmt: skip
    except KeyboardInterrupt:
        err_console.print("interrupted: every process this run started has been stopped")
        raise typer.Exit(EXIT_INTERRUPTED)
    total_cards = job.cluster.card_count
    data = write_report(run, report, total_cards) if report is not None else report_dict(run, total_cards)
    _print(data)
    if json_out is not None:
        json_out.write_text(json.dumps(data, indent=2))
    if report is not None:
        console.print(f"report: {report / 'report.html'} (also report.md, report.json)", highlight=False)
    if not run.passed:
        raise typer.Exit(EXIT_FAILED)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print(data: dict) -> None:
    trials = Table(title="chaos trials")
    for column in ("trial", "state", "fault", "detected", "verdict", "detect s", "resume s", "steps lost", "evidence"):
        trials.add_column(column, overflow="fold")
    for t in data["trials"]:
        state = t["state"] if t["state"] == "COMPLETED" else f"[red]{t['state']}[/]"
        for number, f in enumerate(t["faults"]):
            fault = f"{f['fault']['kind']} {f['where']}"
            trials.add_row(str(t["trial"]) if number == 0 else "", state if number == 0 else "", fault,
                           "yes" if f["detected"] else "[red]no[/]", f["verdict"], _fmt(f["detect_s"]), _fmt(f["resume_s"]),
                           str(f["steps_lost"]), f["reason"])  # fmt: skip
    console.print(trials)
    kinds = Table(title="per fault kind")
    for column in ("kind", "survived", "detect p50 / p95 s", "recover p50 / p95 s", "most steps lost"):
        kinds.add_column(column, overflow="fold")
    for kind, k in data["kinds"].items():
        kinds.add_row(kind, f"{k['survived']}/{k['trials']}", f"{_fmt(k['detect_p50_s'])} / {_fmt(k['detect_p95_s'])}",
                      f"{_fmt(k['recover_p50_s'])} / {_fmt(k['recover_p95_s'])}", str(k["max_steps_lost"]))  # fmt: skip
    console.print(kinds)
    for t in data["trials"]:
        ended = "" if t["state"] == "COMPLETED" else f" ({t['state']}: {t['message']})"
        console.print(f"trial {t['trial']}: {t['run_dir']}{ended}", highlight=False)
    if data["reference"]:
        ref = data["reference"]
        console.print(f"fault-free reference: {ref['run_dir']} (final loss {_fmt(ref['final_loss'])})", highlight=False)
    console.print("[green]passed[/]" if data["passed"] else "[red]failed[/]")
