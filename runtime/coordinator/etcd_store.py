"""The job-state `Store` on etcd v3, for a coordinator that must survive its own restart: a new
coordinator pointed at the same etcd reads the job back. Keys live under one prefix (`/hyrun/`),
values are JSON text, exactly as in `MemoryStore`. Client: `pyetcd` (pip `etcd-sdk-python`), the
maintained fork of python-etcd3 whose generated code loads on today's protobuf (deploy/README.md)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import grpc

try:
    import pyetcd
    import pyetcd.utils
    from pyetcd.exceptions import Etcd3Exception
except ModuleNotFoundError as _missing:  # only a coordinator configured for etcd needs it
    pyetcd = None
    _IMPORT_ERROR: ModuleNotFoundError | None = _missing
else:
    _IMPORT_ERROR = None

PIP_REQUIREMENT = "etcd-sdk-python==0.0.7"
DEFAULT_PREFIX = "/hyrun/"
# Keys per range request when listing: pages keep each response far below gRPC's 4 MiB default
# receive limit however many jobs the store holds.
_LIST_PAGE_KEYS = 256
# What etcd answers to a value over its --max-request-bytes (1.5 MiB by default): INVALID_ARGUMENT
# just over it, RESOURCE_EXHAUSTED from gRPC itself further over. Both are the caller's to fix.
_REFUSED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


class EtcdUnavailable(ConnectionError):
    """etcd did not answer (down, unreachable, or slower than the call timeout)."""


class EtcdStore:
    """`Store` against one etcd endpoint. Every call has a deadline, so a dead etcd surfaces as
    `EtcdUnavailable` instead of a coordinator that hangs."""

    def __init__(self, host: str, port: int, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 5.0) -> None:
        if pyetcd is None:
            raise ValueError(f"the etcd store needs its client library: pip install '{PIP_REQUIREMENT}'") from _IMPORT_ERROR
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"etcd key prefix {prefix!r} must start and end with '/'")
        if timeout_s <= 0:
            raise ValueError(f"etcd timeout_s={timeout_s} must be positive")
        self.address = f"{host}:{port}"
        self.prefix = prefix
        # time_retry=0: pyetcd marks an endpoint that failed one call as dead for time_retry seconds
        # (default 300) and refuses every call meanwhile; with our single endpoint that would turn a
        # one-second etcd restart into five minutes without a store. The gRPC channel reconnects.
        endpoint = pyetcd.Endpoint(host, port, secure=False, time_retry=0)
        self._client = pyetcd.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=timeout_s)
        try:
            self._call("connect", lambda: self._client.status())
        except EtcdUnavailable:
            self._client.close()
            raise

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> EtcdStore:
        """`etcd://HOST:PORT` (the job file's `store`)."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "etcd" or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"store {url!r}: an etcd store is written etcd://HOST:PORT")
        return cls(parts.hostname, port, **kwargs)

    def put(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        self._call(f"put {key}", lambda: self._client.put(self._full(key), text))

    def get(self, key: str) -> dict[str, Any] | None:
        raw, _meta = self._call(f"get {key}", lambda: self._client.get(self._full(key)))
        return None if raw is None else json.loads(raw)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self._client.delete(self._full(key)))

    def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        start = self._full(prefix).encode()
        end = pyetcd.utils.prefix_range_end(start)
        found: dict[str, dict[str, Any]] = {}
        revision = None  # every page reads the revision the first one saw: one consistent snapshot
        while True:
            response = self._call(
                f"list {prefix}",
                lambda: self._client.get_range_response(
                    start, end, sort_order="ascend", limit=_LIST_PAGE_KEYS, revision=revision
                ),
            )
            revision = response.header.revision
            for kv in response.kvs:
                found[kv.key.decode()[len(self.prefix):]] = json.loads(kv.value)
            if not response.more:
                return found
            start = response.kvs[-1].key + b"\0"

    def close(self) -> None:
        self._client.close()

    def _full(self, key: str) -> str:
        return self.prefix + key

    def _call(self, what: str, call):
        try:
            return call()
        except Etcd3Exception as error:  # pyetcd's mapping of UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL
            raise EtcdUnavailable(f"etcd at {self.address}: {what}: {error}") from error
        except grpc.RpcError as error:
            if error.code() in _REFUSED_CODES:
                raise ValueError(f"etcd at {self.address} refused {what}: {error.details()}") from error
            raise EtcdUnavailable(f"etcd at {self.address}: {what}: {error.code().name} {error.details()}") from error
