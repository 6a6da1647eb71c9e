"""What `hyrun chaos run` leaves behind: per trial and per fault (injected at, detected, verdict and
evidence, resumed, steps lost, cards left), per fault kind (survived k/N, detection and recovery
p50/p95), written as JSON (for tools), markdown (for a ticket) and an HTML page with plots: each
trial's loss against the fault-free reference with its faults marked, and its pace (steps per
second) with the detection and recovery spans shaded. Plots need matplotlib (the `report` extra);
without it the page has the tables and says so."""

from __future__ import annotations

import html
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hyrun.runtime.chaos import ChaosReport, ChaosRun


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cards_left(trial: ChaosReport, total_cards: int) -> int:
    return total_cards - len({e.split(":")[0] for e in trial.outcome.evictions})


def kind_of(fault) -> str:
    """The row a fault counts in: its kind, and for a signal which one and to what."""
    return f"signal {fault.signal} {fault.target}" if fault.kind == "signal" else fault.kind


def per_kind(run: ChaosRun) -> dict[str, dict[str, Any]]:
    """Per fault kind: trials it was in, trials survived, detection / recovery p50 and p95, most steps lost."""
    kinds: dict[str, dict[str, list]] = {}
    for trial in run.trials:
        for fault in trial.faults:
            entry = kinds.setdefault(kind_of(fault.fault), {"survived": [], "detect": [], "resume": [], "lost": []})
            entry["survived"].append(trial.passed and fault.detected)
            entry["detect"] += [fault.detect_s] if fault.detect_s is not None else []
            entry["resume"] += [fault.resume_s] if fault.resume_s is not None else []
            entry["lost"].append(fault.steps_lost)
    return {
        kind: {
            "trials": len(e["survived"]), "survived": sum(e["survived"]),
            "detect_p50_s": _quantile(e["detect"], 0.5), "detect_p95_s": _quantile(e["detect"], 0.95),
            "recover_p50_s": _quantile(e["resume"], 0.5), "recover_p95_s": _quantile(e["resume"], 0.95),
            "max_steps_lost": max(e["lost"], default=0),
        }  # fmt: skip
        for kind, e in kinds.items()
    }


def report_dict(run: ChaosRun, total_cards: int) -> dict[str, Any]:
    reference = run.reference
    return {
        "passed": run.passed,
        "expect": run.scenario.expect,
        "seed": run.scenario.seed,
        "reference": None if reference is None else {"job": reference.job_id, "state": reference.state,
                                                     "run_dir": str(reference.run_dir),
                                                     "final_loss": reference.losses[max(reference.losses)] if reference.losses else None},
        "kinds": per_kind(run),
        "trials": [
            {
                "trial": number + 1, "job": t.outcome.job_id, "state": t.outcome.state, "message": t.outcome.message,
                "run_dir": str(t.outcome.run_dir), "passed": t.passed, "final_loss": t.final_loss,
                "loss_matches": t.loss_matches, "generations": t.outcome.generations,
                "cards_left": cards_left(t, total_cards), "wall_time_s": t.outcome.wall_time_s,
                "faults": [dict(asdict(f), fault=f.fault.model_dump(include=f.fault.used_fields()), where=f.fault.where)
                           for f in t.faults],
            }  # fmt: skip
            for number, t in enumerate(run.trials)
        ],
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Chaos report: {'PASSED' if report['passed'] else 'FAILED'} (seed {report['seed']}, expect {report['expect']})", ""]
    if report["reference"]:
        ref = report["reference"]
        lines += [f"Fault-free reference: job `{ref['job']}` ({ref['state']}), final loss {_fmt(ref['final_loss'])}, `{ref['run_dir']}`", ""]
    lines += ["## Per fault kind", "", "| kind | survived | detect p50 / p95 s | recover p50 / p95 s | most steps lost |",
              "| --- | --- | --- | --- | --- |"]
    for kind, k in report["kinds"].items():
        lines.append(f"| {kind} | {k['survived']}/{k['trials']} | {_fmt(k['detect_p50_s'])} / {_fmt(k['detect_p95_s'])} | "
                     f"{_fmt(k['recover_p50_s'])} / {_fmt(k['recover_p95_s'])} | {k['max_steps_lost']} |")
    lines += ["", "## Trials", "", "| trial | state | faults (detected, verdict, steps lost) | final loss | cards left | run dir |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in report["trials"]:
        faults = "; ".join(f"{f['fault']['kind']} {f['where']}: {'yes' if f['detected'] else 'NO'}, {f['verdict'] or '-'}, "
                           f"{f['steps_lost']}" for f in t["faults"])
        state = t["state"] if not t["message"] or t["state"] == "COMPLETED" else f"{t['state']}: {t['message']}"
        lines.append(f"| {t['trial']} | {state.replace('|', '/')} | {faults} | {_fmt(t['final_loss'])} | {t['cards_left']} | `{t['run_dir']}` |")
    return "\n".join(lines) + "\n"


def _plots(run: ChaosRun) -> str:
    """Inline SVG: loss vs step with fault markers, and pace over time with detection/recovery spans."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return "<p><em>Plots need matplotlib (pip install 'hyrun[report]'); the tables above hold every figure.</em></p>"
    figure, (loss_ax, pace_ax) = plt.subplots(2, 1, figsize=(9, 7))
    if run.reference is not None and run.reference.losses:
        steps = sorted(run.reference.losses)
        loss_ax.plot(steps, [run.reference.losses[s] for s in steps], color="black", linewidth=2, label="fault-free")
    for number, trial in enumerate(run.trials):
        outcome = trial.outcome
        steps = sorted(outcome.losses)
        line = loss_ax.plot(steps, [outcome.losses[s] for s in steps], alpha=0.7, label=f"trial {number + 1}")[0]
        for incident in outcome.incidents:
            loss_ax.axvline(int(incident.get("step_at_failure", 0)) + 1, color=line.get_color(), linestyle=":", alpha=0.8)
        times = [outcome.step_done_s[s] for s in steps if s in outcome.step_done_s]
        if len(times) > 1:
            pace = [1.0 / max(b - a, 1e-3) for a, b in zip(times, times[1:])]
            pace_ax.plot(times[1:], pace, color=line.get_color(), alpha=0.7)
        for incident in outcome.incidents:
            detected, resumed = incident.get("detected_at_s"), incident.get("resumed_at_s")
            before = incident.get("last_step_before_s", detected)
            if detected is not None:
                pace_ax.axvspan(before, detected, color="orange", alpha=0.15)
                pace_ax.axvspan(detected, resumed or detected, color="red", alpha=0.12)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss vs the fault-free run (dotted: a fault's step)")
    loss_ax.legend(fontsize="small", ncol=4)
    pace_ax.set(xlabel="seconds since submission", ylabel="steps / s", title="pace (orange: detecting, red: recovering)")
    figure.tight_layout()
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def html_page(report: dict[str, Any], run: ChaosRun) -> str:
    import markdown_it  # rich's dependency: already installed wherever hyrun is

    body = markdown_it.MarkdownIt("commonmark").enable("table").render(markdown(report))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}th{background:#eee}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape('hyrun chaos report')}</title>"
            f"<style>{style}</style></head><body>{body}<h2>Plots</h2><div id='plots'>{_plots(run)}</div></body></html>")


def write_report(run: ChaosRun, directory: Path, total_cards: int) -> dict[str, Any]:
    """Writes report.json, report.md and report.html into `directory`; returns the report."""
    directory.mkdir(parents=True, exist_ok=True)
    report = report_dict(run, total_cards)
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(markdown(report))
    (directory / "report.html").write_text(html_page(report, run))
    return report
