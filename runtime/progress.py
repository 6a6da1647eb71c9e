"""What `hyrun launch` shows while a job runs: a rich live view (step bar, loss, tokens/s, per-node
state) on a terminal, one plain line every few steps otherwise (CI logs, pipes)."""

from __future__ import annotations

import math
import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hyrun.proto import hyrun_pb2 as pb


def _fmt_loss(loss: float) -> str:
    return "-" if math.isnan(loss) else f"{loss:.4f}"


def _fmt_eval(event: pb.JobEvent) -> str:
    """The newest held-out loss the evaluation beside training reported, and the checkpoint it scored."""
    return f"{_fmt_loss(event.eval_loss)} @{event.eval_step}" if event.eval_step else "-"


class ProgressView:
    def __init__(self, console: Console, live: bool, plain_every_s: float = 2.0) -> None:
        self.console = console
        self.live_enabled = live
        self.plain_every_s = plain_every_s
        self._last_plain_s = 0.0
        self._last_plain_step = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}  {task.fields[tps]} tok/s  gen {task.fields[gen]}"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("waiting for nodes", total=None, loss="-", eval="-", tps="-", gen="-")
        self._nodes = Table()
        self._live: Live | None = None

    def __enter__(self) -> ProgressView:
        if self.live_enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _render(self) -> Group:
        return Group(self._progress, self._nodes)

    def update(self, event: pb.JobEvent) -> None:
        description = "training" if event.state == "RUNNING" else event.state.lower()
        self._progress.update(
            self._task,
            description=description,
            total=event.total_steps or None,
            completed=event.step,
            loss=_fmt_loss(event.loss),
            eval=_fmt_eval(event),
            tps=f"{event.tokens_per_s:,.0f}",
            gen=f"{event.generation} ({event.layout})" if event.layout else str(event.generation or "-"),
        )
        table = Table(box=None, show_header=True, header_style="dim")
        for column in ("node", "cards", "state"):
            table.add_column(column)
        for node in event.nodes:
            style = "red" if not node.alive else "green" if node.state == "training" else ""
            table.add_row(node.node, str(node.cards), f"[{style}]{node.state}[/]" if style else node.state)
        self._nodes = table
        if self._live is not None:
            self._live.update(self._render())
        elif event.step > self._last_plain_step and (
            time.monotonic() - self._last_plain_s >= self.plain_every_s or event.step == event.total_steps
        ):
            self._last_plain_s, self._last_plain_step = time.monotonic(), event.step
            self.console.print(
                f"step {event.step}/{event.total_steps}  loss {_fmt_loss(event.loss)}  "
                + (f"eval {_fmt_eval(event)}  " if event.eval_step else "")
                + f"{event.tokens_per_s:,.0f} tok/s  generation {event.generation}"
                + (f" ({event.layout})" if event.layout else "")
            )
