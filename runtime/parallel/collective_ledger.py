"""Bytes a rank moves and time it spends per kind of collective, per step, for the step report.

torch has no per-collective accounting on gloo (NCCL's flight recorder is NCCL-only, the profiler
too heavy to leave on), so the worker wraps `torch.distributed`'s collective functions once at
start-up. Everything that calls them through the module — hyrun's own all-reduces and expert
all-to-alls, FSDP2's gathers and reduce-scatters (`dist.all_gather_single`, ...), the pipeline's
batched sends — is counted; what goes through functional collectives (DTensor's TP redistributes)
or C++ directly is not. Bytes are the rank's input to the collective. Seconds are the time inside
the call: all of a blocking collective, only the issue of an async one (its wait is in the step's
comm wait). `isend`/`irecv` are left alone: pipelining compares them by identity.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from typing import Any, Callable

# torch.distributed function -> the kind it is reported as
_KINDS = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "batch_isend_irecv": "p2p",
}
# function -> (position, keyword) of the rank's input
_INPUT_ARG = {
    "all_reduce": (0, "tensor"),
    "all_gather_single": (1, "input_tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "reduce_scatter_single": (1, "input"),
    "reduce_scatter_tensor": (1, "input"),
    "all_to_all_single": (1, "input"),
    "broadcast": (0, "tensor"),
    "batch_isend_irecv": (0, "p2p_op_list"),
}


def _nbytes(value: Any) -> int:
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return value.element_size() * value.numel()
    if hasattr(value, "tensor"):  # a P2POp
        return _nbytes(value.tensor)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveLedger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, float] = defaultdict(float)
        self._seconds: dict[str, float] = defaultdict(float)
        self.installed = False

    def record(self, kind: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._bytes[kind] += nbytes
            self._seconds[kind] += seconds

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """(bytes, seconds) per kind since the last take."""
        with self._lock:
            taken = dict(self._bytes), dict(self._seconds)
            self._bytes.clear()
            self._seconds.clear()
        return taken

    def _wrap(self, name: str, fn: Callable) -> Callable:
        kind, (position, keyword) = _KINDS[name], _INPUT_ARG[name]

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                data = args[position] if len(args) > position else kwargs.get(keyword)
                self.record(kind, _nbytes(data), time.perf_counter() - started)

        counted.__hyrun_counted__ = True
        return counted

    def install(self) -> None:
        """Wraps the collectives on `torch.distributed` (once per process)."""
        import torch.distributed as dist

        for name in _KINDS:
            fn = getattr(dist, name, None)
            if fn is not None and not getattr(fn, "__hyrun_counted__", False):
                setattr(dist, name, self._wrap(name, fn))
        self.installed = True


LEDGER = CollectiveLedger()  # the process's one ledger: the collectives it wraps are process-wide
