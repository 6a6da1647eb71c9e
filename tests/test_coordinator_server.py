"""The coordinator's gRPC edge: the job token is enforced, /metrics is served, it listens on loopback."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from hyrun.proto import hyrun_pb2 as pb
from hyrun.proto import hyrun_pb2_grpc as pb_grpc
from hyrun.runtime.coordinator.server import CoordinatorService, CoordinatorSettings
from hyrun.common.security import call_metadata

from conftest import FakeRendezvous


@pytest.fixture
def service(tmp_path):
    svc = CoordinatorService(CoordinatorSettings(token="s3cret", run_root=str(tmp_path), heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0), open_rendezvous=FakeRendezvous)
    svc.start()
    yield svc
    svc.stop()


@pytest.mark.timeout(30)
def test_calls_without_the_token_are_refused(service):
    assert service.address.startswith("127.0.0.1:")
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for metadata in ((), call_metadata("wrong")):
            with pytest.raises(grpc.RpcError) as error:
                stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Connect(iter([pb.AgentMessage(register=pb.Register(node="x"))]), metadata=(), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Status(pb.StatusRequest(), metadata=call_metadata("s3cret"), timeout=5).jobs == []


@pytest.mark.timeout(30)
def test_a_registered_node_shows_in_status_and_metrics(service):
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        register = pb.AgentMessage(register=pb.Register(node="n1", cards=[pb.CardInfo(index=0, type="cpu-sim")]))

        def requests():
            yield register
            import time
            time.sleep(0.5)

        stream = stub.Connect(requests(), metadata=call_metadata("s3cret"))
        assert next(stream).HasField("welcome")
        status = stub.Status(pb.StatusRequest(), metadata=call_metadata("s3cret"), timeout=5)
        assert [(n.node, n.cards, n.alive) for n in status.nodes] == [("n1", 1, True)]
        stream.cancel()
    body = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
    assert "hyrun_nodes_alive 1.0" in body
    assert "hyrun_cards 1.0" in body


@pytest.mark.timeout(30)
def test_bad_job_submission_is_refused_with_the_field(service):
    with grpc.insecure_channel(service.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.SubmitJob(pb.SubmitJobRequest(job_yaml="cluster: {nodes: []}"), metadata=call_metadata("s3cret"), timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cluster.nodes" in error.value.details()
