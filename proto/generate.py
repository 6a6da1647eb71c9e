"""Regenerates proto/hyrun_pb2.py and hyrun_pb2_grpc.py from hyrun.proto.

Run `python -m hyrun.proto.generate` after editing the .proto; tests/test_proto.py fails when the
committed modules are stale. `render()` returns the generated text so the test can compare.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "hyrun.proto"
OUTPUTS = ("hyrun_pb2.py", "hyrun_pb2_grpc.py", "hyrun_pb2.pyi")


def render() -> dict[str, str]:
    """Generated module texts by file name, with the grpc module importing its sibling by package."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        texts = {name: (Path(out) / name).read_text() for name in OUTPUTS}
    # protoc writes a top-level `import hyrun_pb2`; inside the package it must be relative.
    texts["hyrun_pb2_grpc.py"] = texts["hyrun_pb2_grpc.py"].replace(
        "import hyrun_pb2 as hyrun__pb2", "from . import hyrun_pb2 as hyrun__pb2"
    )
    return texts


def main() -> int:
    for name, text in render().items():
        (PROTO_DIR / name).write_text(text)
        print(f"wrote {PROTO_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
