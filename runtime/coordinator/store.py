"""Where the coordinator keeps job state: a small key-value `Store` Protocol and its in-memory
implementation (the default, so `hyrun launch` needs nothing else). Keys are '/'-separated paths;
values are JSON-serialisable dicts. The coordinator is the single writer."""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol


class Deposed(RuntimeError):
    """The store refused a write because another coordinator has since been elected leader."""


class Store(Protocol):
    def put(self, key: str, value: dict[str, Any]) -> None: ...

    def get(self, key: str) -> dict[str, Any] | None: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None: ...


class MemoryStore:
    """A dict behind a lock. Values are stored as JSON text so that what works here also works
    against etcd (no live objects leak through the store). It dies with the coordinator's process:
    with it, a restarted coordinator starts with no job (a restart means a new job)."""

    durable = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}

    def put(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        with self._lock:
            self._data[key] = text

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            text = self._data.get(key)
        return None if text is None else json.loads(text)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            items = [(k, v) for k, v in self._data.items() if k.startswith(prefix)]
        return {key: json.loads(text) for key, text in sorted(items)}

    def close(self) -> None:
        pass
