"""The job's and the generation's lifecycles as transition tables: an illegal transition raises
instead of leaving the job in a state nobody planned for. (The worker process's table lives with
the agent, which owns workers.)"""

from __future__ import annotations

import enum
from typing import TypeVar


class IllegalTransition(RuntimeError):
    pass


class JobState(enum.Enum):
    PENDING = "PENDING"      # waiting for the job's nodes to register
    RUNNING = "RUNNING"      # some generation is running (or being replaced by the next)
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
}


class GenState(enum.Enum):
    STARTING = "STARTING"    # StartGeneration sent; waiting for every rank to report a step
    RUNNING = "RUNNING"      # every rank has trained a step: the hang clock runs
    DRAINING = "DRAINING"    # a checkpoint was asked for; verdicts wait for it to commit
    FAILING = "FAILING"      # a worker died: collecting its peers' exits for a short grace to find the culprit
    COMPLETED = "COMPLETED"  # every rank finished all its steps and exited 0
    STOPPED = "STOPPED"      # ended by the coordinator (fault, drain, join, job failure); agents stop its
    #                          workers before they start the next generation's


GENERATION_TRANSITIONS: dict[GenState, frozenset[GenState]] = {
    GenState.STARTING: frozenset({GenState.RUNNING, GenState.FAILING, GenState.COMPLETED, GenState.STOPPED}),
    GenState.RUNNING: frozenset({GenState.DRAINING, GenState.FAILING, GenState.COMPLETED, GenState.STOPPED}),
    GenState.DRAINING: frozenset({GenState.FAILING, GenState.COMPLETED, GenState.STOPPED}),
    GenState.FAILING: frozenset({GenState.STOPPED}),
    GenState.COMPLETED: frozenset(),
    GenState.STOPPED: frozenset(),
}

S = TypeVar("S", bound=enum.Enum)


def check_transition(table: dict[S, frozenset[S]], old: S, new: S, what: str) -> S:
    """Returns `new` if the table allows old -> new, else raises naming both."""
    if new not in table[old]:
        raise IllegalTransition(f"{what}: {old.value} -> {new.value} is not allowed")
    return new
