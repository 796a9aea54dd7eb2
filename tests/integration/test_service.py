"""Service behaviour of the coordinator process: health checking and graceful shutdown."""

import signal

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol.channel import secure_channel
from tests.conftest import start_cloud

pytestmark = pytest.mark.integration


def test_health_check_and_graceful_sigterm(tiny_dirs, pki, tmp_path):
    cloud = start_cloud(str(tiny_dirs["gpt2"]), pki, tmp_path / "store")
    with secure_channel(cloud.address, pki / "clients" / "alice") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "edgetune.v1.Coordinator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    cloud.process.send_signal(signal.SIGTERM)
    assert cloud.process.wait(timeout=30) == 0
    assert "edgetune-cloud stopped" in cloud.log.read_text()
