"""The lifecycle of one worker process in the agent, as an explicit state machine (the style of
runtime/coordinator/generation.py): a warm spare is assigned a rank, is stopped (SIGTERM, then
SIGKILL after a bound) or dies on its own, and is reaped. An illegal transition raises."""

from __future__ import annotations

import enum
import threading


class WorkerState(enum.Enum):
    SPARE = "SPARE"        # started warm (torch imported), waiting on its command pipe for a rank
    ASSIGNED = "ASSIGNED"  # holds a rank of a generation
    STOPPING = "STOPPING"  # SIGTERM sent to its process group; SIGKILL follows after the grace
    KILLED = "KILLED"      # SIGKILL sent to its process group; waiting for the kernel to reap it
    EXITED = "EXITED"      # reaped: its exit code is known


ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.SPARE: frozenset({WorkerState.ASSIGNED, WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.ASSIGNED: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.KILLED, WorkerState.EXITED}),
    WorkerState.KILLED: frozenset({WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}
# States in which the process may still run, and stopping it still means something.
LIVE = frozenset({WorkerState.SPARE, WorkerState.ASSIGNED})


class IllegalTransition(RuntimeError):
    pass


class WorkerLifecycle:
    """One worker's state. Moved by the supervisor's threads (the command handler that assigns and
    stops, the report reader that sees the exit), so every move holds a lock."""

    def __init__(self) -> None:
        self._state = WorkerState.SPARE
        self._lock = threading.Lock()
        self.stopped_by_agent = False  # set on entering STOPPING: its exit was asked for, not a fault

    @property
    def state(self) -> WorkerState:
        return self._state

    def move(self, to: WorkerState) -> WorkerState:
        """Moves to `to`; returns the state it left. Raises IllegalTransition if the table forbids it."""
        with self._lock:
            return self._move(to)

    def move_if(self, allowed_from: frozenset[WorkerState], to: WorkerState) -> bool:
        """Moves to `to` only from one of `allowed_from` (checked and moved at once, so two threads
        cannot both stop one worker); False if it was in another state."""
        with self._lock:
            if self._state not in allowed_from:
                return False
            self._move(to)
            return True

    def _move(self, to: WorkerState) -> WorkerState:
        if to not in ALLOWED[self._state]:
            raise IllegalTransition(f"worker {self._state.value} -> {to.value}")
        left, self._state = self._state, to
        if to is WorkerState.STOPPING:
            self.stopped_by_agent = True
        return left
