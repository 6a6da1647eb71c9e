"""One etcd member on loopback, in its own session so that stopping it stops all of it: the store a
chaos trial's `store_outage` takes away and gives back, and the one tests and benchmarks start.
Its ports are picked free once and kept, so a restart on the same data directory is the same server
to its clients (as a restarted member of a real cluster is)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from hyrun.common.process import kill_group


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def free_port() -> int:
    # Never a fixed port: bind port 0 and hand the number over. Another process could take it in
    # between; etcd then exits at once and start() fails with etcd's own log, not a hang.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalEtcd:
    def __init__(self, data_dir: Path, name: str = "hyrun") -> None:
        self.data_dir = data_dir
        self.name = name
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The address hyrun's `store:` takes."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, timeout_s: float = 20.0) -> None:
        """Starts it (again, on the same data and ports) and returns once it reports healthy; raises
        RuntimeError with the end of etcd's log if it exits or stays unhealthy."""
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("the etcd binary is not installed (apt-get install etcd-server)")
        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--name", self.name, "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"{self.name}={peer}", "--log-level", "warn", "--logger", "zap"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{client}/health", timeout=1) as response:
                    if json.load(response).get("health") == "true":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd not healthy after {timeout_s:g} s: {self._log_tail()}")

    def kill(self) -> None:
        if self.proc is None:
            return
        kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"
