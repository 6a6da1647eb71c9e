"""Process-lifetime helpers shared by the launcher, agents and workers: nothing hyrun starts may
outlive the process that started it, and a record naming a process (pid and start time) can tell
whether that very process still runs."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


RECONNECT_BACKOFF_S = (0.1, 1.0)  # first and longest pause between attempts to reach a coordinator


def reconnect_pause_s(rounds: int) -> float:
    """The pause before the next try after `rounds` rounds of failed attempts: doubling from the
    first to the longest, jittered ±50% so that thousands of agents do not retry in step."""
    first_s, longest_s = RECONNECT_BACKOFF_S
    return min(longest_s, first_s * 2**rounds) * random.uniform(0.5, 1.5)


def kill_group(pgid: int, sig: signal.Signals) -> bool:
    """Signals a whole process group; False if it is already gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22); None if there
    is no such live process (a zombie counts as gone). The pair (pid, start ticks) names one process:
    the kernel may hand a dead process's pid to a new one, which then has a later start time."""
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:  # FileNotFoundError: no such pid; ProcessLookupError on some kernels
        return None
    # comm (field 2) may hold spaces and parentheses: the fields that follow start after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def is_same_process(pid: int, start_ticks: int) -> bool:
    """True if `pid` is alive and is the very process that had `start_ticks` (not a reuse of its pid)."""
    return pid > 0 and process_start_ticks(pid) == start_ticks
