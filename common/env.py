"""Environment variables hyrun's processes read, and their defaults: constants only, so a command's
help text can name them without loading gRPC or pydantic."""

from __future__ import annotations

from pathlib import Path

TOKEN_ENV = "HYRUN_TOKEN"        # the job token every gRPC call must carry
SHM_DIR_ENV = "HYRUN_SHM_DIR"    # the tmpfs folder for RAM checkpoint snapshots
DEFAULT_SHM_DIR = Path("/dev/shm")
