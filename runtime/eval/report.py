"""Sends each checkpoint evaluation to the coordinator (the ReportEval RPC), which owns every metric:
it exports them as `hyrun_eval_*` and shows the newest in the job's events. Torch-free. A coordinator
that cannot be reached (the job just ended, a failover) costs this one report, never the evaluation:
the result is in eval.jsonl either way."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.common.env import TOKEN_ENV
from hyrun.common.security import TlsFiles, call_metadata, open_channel, token_from_env

log = logging.getLogger("hyrun.eval")

# Set by `hyrun launch` for the evaluation process it starts (the token goes in TOKEN_ENV, as for agents).
COORDINATOR_ENV = "HYRUN_EVAL_COORDINATOR"
JOB_ID_ENV = "HYRUN_EVAL_JOB_ID"
TLS_CA_ENV = "HYRUN_EVAL_TLS_CA"
REPORT_TIMEOUT_S = 10.0


def eval_report(job_id: str, record: dict) -> pb.EvalReport:
    """One eval.jsonl record (watch.py) as the coordinator's message."""
    return pb.EvalReport(
        job_id=job_id, step=record["step"], error=record.get("error", ""), duration_s=record.get("duration_s", 0.0),
        sources=[pb.EvalSourceLoss(source=name, loss=s["loss"], perplexity=s["perplexity"], tokens=s.get("tokens", 0))
                 for name, s in record.get("sources", {}).items()],
        tasks=[pb.EvalTaskScore(task=task, metric=metric, value=value)
               for task, scores in record.get("tasks", {}).items() for metric, value in scores.items()],
    )  # fmt: skip


@dataclass(frozen=True)
class CoordinatorTarget:
    addresses: str  # HOST:PORT, or several comma-separated (a leader and its standbys)
    job_id: str
    token: str = ""
    tls: TlsFiles = TlsFiles()

    @classmethod
    def from_env(cls) -> CoordinatorTarget | None:
        """The coordinator `hyrun launch` named for this process, or None (eval.jsonl only)."""
        address, job_id = os.environ.get(COORDINATOR_ENV, ""), os.environ.get(JOB_ID_ENV, "")
        if not address or not job_id:
            return None
        ca = os.environ.get(TLS_CA_ENV, "")
        return cls(address, job_id, token_from_env(), TlsFiles(cert=Path(ca) if ca else None))

    def environment(self) -> dict[str, str]:
        """What the evaluation process needs in its environment to report here (from_env reads it back)."""
        env = {COORDINATOR_ENV: self.addresses, JOB_ID_ENV: self.job_id, TOKEN_ENV: self.token}
        if self.tls.cert is not None:
            env[TLS_CA_ENV] = str(self.tls.cert)
        return env


def send_report(target: CoordinatorTarget, record: dict) -> str:
    """Sends one evaluation to the first coordinator that takes it; returns "" or why none did."""
    report, errors = eval_report(target.job_id, record), []
    for address in (a.strip() for a in target.addresses.split(",") if a.strip()):
        channel = open_channel(address, target.tls)
        try:
            pb_grpc.CoordinatorStub(channel).ReportEval(report, metadata=call_metadata(target.token),
                                                        timeout=REPORT_TIMEOUT_S)
            return ""
        except grpc.RpcError as error:
            errors.append(f"{address}: {error.code().name} {error.details() or ''}".strip())
        finally:
            channel.close()
    log.warning("evaluation of step %s not reported: %s", record["step"], "; ".join(errors))
    return "; ".join(errors)
