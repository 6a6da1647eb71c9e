"""The committed generated modules match hyrun.proto (run `python -m hyrun.proto.generate`)."""

from __future__ import annotations

import pytest

from hyrun.proto import generate


def test_generated_modules_are_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the modules")
    for name, text in generate.render().items():
        committed = (generate.PROTO_DIR / name).read_text()
        assert committed == text, f"proto/{name} is stale: run `python -m hyrun.proto.generate`"
