"""A multi-host-style cluster on loopback: `hyrun coordinator`, two `hyrun agent`s and `hyrun launch
--coordinator`, all separate processes, over TLS with a job token."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from conftest import job_dict


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _read_address(process, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.proc.stdout.readline()
        match = re.search(r"coordinator on (\S+:\d+)", line)
        if match:
            return match.group(1)
    raise AssertionError("the coordinator never said where it listens")


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test's TLS certificate")
def test_separate_coordinator_agents_and_launch_over_tls(write_job, launched, tmp_path):
    cert, key = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("job-secret")
    coordinator = launched(
        "coordinator", "--port", "0", "--metrics-port", "0", "--token-file", str(token),
        "--tls-cert", str(cert), "--tls-key", str(key), "--run-root", str(tmp_path / "runs"),
    )  # fmt: skip
    address = _read_address(coordinator)
    for node in ("node-a", "node-b"):
        launched(
            "agent", "--coordinator", address, "--node", node, "--simulate", "cpu-sim:2",
            "--host", "127.0.0.1", "--heartbeat-interval", "0.2", "--token-file", str(token), "--tls-ca", str(cert),
        )  # fmt: skip
    job = write_job(job_dict(training={"steps": 3}))
    client = launched(
        "launch", str(job), "--coordinator", address, "--token-file", str(token), "--tls-ca", str(cert), "--no-progress"
    )
    stdout, stderr = client.proc.communicate(timeout=90)
    assert client.proc.returncode == 0, stderr
    assert "completed" in stdout

    # Without the token, an agent is refused and says so.
    intruder = launched("agent", "--coordinator", address, "--node", "x", "--simulate", "cpu-sim:1", "--tls-ca", str(cert))
    _, stderr = intruder.proc.communicate(timeout=30)
    assert intruder.proc.returncode == 2 and "refused" in stderr
