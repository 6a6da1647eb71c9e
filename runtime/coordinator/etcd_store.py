"""The job-state `Store` on etcd v3, for a coordinator that must survive its own restart: a new
coordinator pointed at the same etcd reads the job back. Keys live under one prefix (`/hyrun/`),
values are JSON text, exactly as in `MemoryStore`. Client: `pyetcd` (pip `etcd-sdk-python`), the
maintained fork of python-etcd3 whose generated code loads on today's protobuf (deploy/README.md)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable
from urllib.parse import urlsplit

import grpc

from hyrun.runtime.coordinator.store import Deposed

try:
    import pyetcd
    import pyetcd.utils
    from pyetcd.exceptions import ConnectionFailedError, Etcd3Exception
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
# gRPC waits up to 120 s between reconnects to a server that went away, failing every call meanwhile;
# capped at 1 s, a call retried within its deadline gets through about a second after etcd is back.
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]  # fmt: skip
_RETRY_PAUSE_S = 0.05


class EtcdUnavailable(ConnectionError):
    """etcd did not answer (down, unreachable, or slower than the call timeout)."""


class EtcdStore:
    """`Store` against one etcd endpoint. Each call retries a refused connection until `timeout_s`
    has passed (every operation here is idempotent), then raises `EtcdUnavailable`: a blip of etcd
    costs a short wait, a dead etcd an error instead of a coordinator that hangs.

    Once `fence`d by an election, every write is a transaction that succeeds only while the leader
    key still holds this coordinator's revision: a deposed leader cannot overwrite its successor."""

    durable = True

    def __init__(self, host: str, port: int, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 5.0) -> None:
        if pyetcd is None:
            raise ValueError(
                f"the etcd store needs its client library: pip install '{PIP_REQUIREMENT}'"
            ) from _IMPORT_ERROR
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"etcd key prefix {prefix!r} must start and end with '/'")
        if timeout_s <= 0:
            raise ValueError(f"etcd timeout_s={timeout_s} must be positive")
        self.address = f"{host}:{port}"
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._fence: tuple[str, int] | None = None  # (leader key, its create revision) while leading
        # time_retry=0: pyetcd marks an endpoint that failed one call as dead for time_retry seconds
        # (default 300) and refuses every call meanwhile; with our single endpoint that would turn a
        # one-second etcd restart into five minutes without a store. The gRPC channel reconnects.
        endpoint = pyetcd.Endpoint(host, port, secure=False, time_retry=0, opts=_CHANNEL_OPTIONS)
        self._client = pyetcd.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=timeout_s)
        try:
            self.call("connect", self._client.status)
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

    @property
    def client(self) -> Any:
        return self._client

    def full_key(self, key: str) -> str:
        return self._full(key)

    def fence(self, leader_key: str, revision: int) -> None:
        """From now on, write only while `leader_key` (a full key) was created at `revision`."""
        self._fence = (leader_key, revision)

    def put(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        if self._fence is None:
            self.call(f"put {key}", self._client.put, self._full(key), text)
            return
        leader_key, revision = self._fence
        txn = self._client.transactions
        succeeded, _ = self.call(
            f"put {key}", self._client.transaction,
            compare=[txn.create(leader_key) == revision], success=[txn.put(self._full(key), text)], failure=[],
        )  # fmt: skip
        if not succeeded:
            raise Deposed(f"etcd at {self.address}: another coordinator leads now (this one was elected at revision {revision})")

    def get(self, key: str) -> dict[str, Any] | None:
        raw, _meta = self.call(f"get {key}", self._client.get, self._full(key))
        return None if raw is None else json.loads(raw)

    def delete(self, key: str) -> None:
        self.call(f"delete {key}", self._client.delete, self._full(key))

    def list(self, prefix: str) -> dict[str, dict[str, Any]]:
        start = self._full(prefix).encode()
        end = pyetcd.utils.prefix_range_end(start)
        found: dict[str, dict[str, Any]] = {}
        revision = None  # every page reads the revision the first one saw: one consistent snapshot
        while True:
            response = self.call(
                f"list {prefix}", self._client.get_range_response,
                start, end, sort_order="ascend", limit=_LIST_PAGE_KEYS, revision=revision,
            )  # fmt: skip
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

    def call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One client call, its errors turned into ours: etcd down or slow -> `EtcdUnavailable` (a
        ConnectionError), a request etcd refuses -> ValueError, both naming the address and the key."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return method(*args, **kwargs)
            except ConnectionFailedError as error:  # UNAVAILABLE: refused, or gRPC between reconnects
                if time.monotonic() + _RETRY_PAUSE_S < deadline:
                    time.sleep(_RETRY_PAUSE_S)
                    continue
                raise EtcdUnavailable(f"etcd at {self.address}: {what}: no answer in {self.timeout_s} s") from error
            except Etcd3Exception as error:  # DEADLINE_EXCEEDED, INTERNAL
                raise EtcdUnavailable(f"etcd at {self.address}: {what}: {error}") from error
            except grpc.RpcError as error:
                if error.code() in _REFUSED_CODES:
                    raise ValueError(f"etcd at {self.address} refused {what}: {error.details()}") from error
                raise EtcdUnavailable(
                    f"etcd at {self.address}: {what}: {error.code().name} {error.details()}"
                ) from error
