"""gRPC security: the job token (a shared secret every call must carry) and optional TLS.

Servers listen on loopback unless told otherwise; a token is compared in constant time; TLS
certificates come from PEM files. Nothing received over the network is ever unpickled."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from hyrun.common.env import TOKEN_ENV

_AUTH_KEY = "authorization"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path | None = None  # server's certificate (server) / CA to trust (client)
    key: Path | None = None   # server's private key

    @property
    def enabled(self) -> bool:
        return self.cert is not None


def token_from_env() -> str:
    return os.environ.get(TOKEN_ENV, "")


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((_AUTH_KEY, f"Bearer {token}"),) if token else ()


async def _abort_unauthenticated(_request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong job token")


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_abort_unauthenticated)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_abort_unauthenticated)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_abort_unauthenticated)
    return grpc.unary_unary_rpc_method_handler(_abort_unauthenticated)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks the job token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(_AUTH_KEY, "").encode()
        if handler is None or hmac.compare_digest(given, self._expected):
            return handler
        return _denying(handler)


def add_port(server: grpc.aio.Server, address: str, tls: TlsFiles) -> int:
    if not tls.enabled:
        return server.add_insecure_port(address)
    if tls.key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key on the coordinator")
    creds = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
    return server.add_secure_port(address, creds)


def open_channel(target: str, tls: TlsFiles) -> grpc.Channel:
    """A blocking channel for agents and the CLI; `tls.cert` is the CA (or self-signed cert) to trust."""
    if not tls.enabled:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(tls.cert.read_bytes()))
