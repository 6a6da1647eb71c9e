"""How a worker tells its agent about each step: one JSON line per step on a pipe the agent
created. Local only, text only: the agent never unpickles what a worker sends."""

from __future__ import annotations

import json
import os

from hyrun.proto import hyrun_pb2 as pb


# The wire message itself: one definition of a step report's fields (proto/hyrun.proto).
StepRecord = pb.StepReport


def _fields(record: pb.StepReport) -> dict:
    """Plain JSON values of every field (the agent rebuilds the message with StepReport(**fields))."""
    return {f.name: dict(getattr(record, f.name)) if _is_map(f) else getattr(record, f.name) for f in record.DESCRIPTOR.fields}


def _is_map(field) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


class Reporter:
    def __init__(self, fd: int | None) -> None:
        self._pipe = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        self.history: list[StepRecord] = []

    def _write(self, kind: str, fields: dict) -> None:
        if self._pipe is not None:
            self._pipe.write(json.dumps({"kind": kind, **fields}) + "\n")

    def report(self, record: StepRecord) -> None:
        self.history.append(record)
        self._write("step", _fields(record))

    def entered_reduce(self, generation: int, rank: int, step: int) -> None:
        """This rank finished its compute for `step` and waits in the gradient all-reduce."""
        self._write("progress", {"generation": generation, "rank": rank, "step": step, "phase": "reduce"})

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
