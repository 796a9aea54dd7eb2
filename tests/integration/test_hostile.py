"""Hostile and malformed input against a real coordinator process: it answers each with a clear
status, logs it, and keeps serving everyone else."""

import copy
import os
import random
import socket
import threading
import time

import grpc
import pytest
import torch

from edge.modes.split import LocalMiddle, RemoteMiddle, split_step
from edge.rpc.client import CloudCallError, CloudClient
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters
from emulator.model.bundle import load_edge_model
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol import edgetune_pb2 as pb
from protocol import edgetune_pb2_grpc as pb_grpc
from protocol import serde
from protocol.accounting import Traffic
from protocol.channel import GRPC_OPTIONS, client_tls, secure_channel
from protocol.tensors import tensor_chunks
from protocol.types import EdgeMessage, Phase
from tests.conftest import start_cloud, stop_cloud
from tests.edge.test_split_equivalence import make_batch

pytestmark = pytest.mark.integration


_REFERENCE: dict[str, torch.nn.Module] = {}  # the served model, for in-process reference steps


@pytest.fixture(scope="module")
def strict_cloud(tiny_dirs, pki, tmp_path_factory):
    _REFERENCE["model"] = load_causal_lm(tiny_dirs["llama"])
    cloud = start_cloud(str(tiny_dirs["llama"]), pki, tmp_path_factory.mktemp("strict"),
                        extra=["--idle-timeout", "2", "--max-streams-per-client", "2", "--max-tensor-mb", "1"])
    yield cloud
    assert cloud.process.poll() is None, "the coordinator died"
    stop_cloud(cloud)


def raw_stub(cloud, pki, name="alice", send_limit=None):
    tls = client_tls(pki / "clients" / name)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    options = [o for o in GRPC_OPTIONS if send_limit is None or o[0] != "grpc.max_send_message_length"]
    if send_limit is not None:
        options.append(("grpc.max_send_message_length", send_limit))
    channel = grpc.secure_channel(cloud.address, creds, options=options)
    return pb_grpc.CoordinatorStub(channel), channel


def healthy_step(cloud, pki, name="alice"):
    """One split step over a real stream, checked against the same step in-process: the loss and every LoRA
    gradient (the cloud's forward and backward both) must match. Returns the loss."""
    with secure_channel(cloud.address, pki / "clients" / name) as channel:
        client = CloudClient(channel)
        info = client.open_session("split")
        edge = load_edge_model(client.bundle(info))
        model = add_lora(edge, LoraSettings(rank=2, alpha=4), edge.bottom.spec)
        with torch.no_grad():  # nonzero B: the top's LoRA gradients then depend on the cloud's output too
            for name_, param in model.named_parameters():
                if "lora_B" in name_:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        reference = copy.deepcopy(model)
        stream = client.train_stream(info)
        loss = split_step(model, RemoteMiddle(stream), 1, *make_batch(), Traffic()).loss
        stream.close()
    served = _REFERENCE["model"]
    middle = LocalMiddle(extract_middle(served, plan_for(served.config, info.model.edge_layers)))
    want = split_step(reference, middle, 1, *make_batch(), Traffic()).loss
    assert loss == pytest.approx(want, rel=1e-5)
    for (name_, got), expected in zip(lora_parameters(model).items(), lora_parameters(reference).values()):
        assert got.grad is not None and expected.grad is not None and expected.grad.abs().sum() > 0, name_
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name_)
    return loss


def test_garbage_bytes_on_the_port(strict_cloud, pki):
    host, port = strict_cloud.address.split(":")
    for size in (1, 7, 4096, 65536):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(os.urandom(size))
            time.sleep(0.05)
    assert healthy_step(strict_cloud, pki) > 0


def test_oversized_tensor_and_message_are_refused(strict_cloud, pki):
    with secure_channel(strict_cloud.address, pki / "clients" / "alice") as channel:
        client = CloudClient(channel)
        info = client.open_session("split")
        with pytest.raises(CloudCallError, match="INVALID_ARGUMENT.*exceeds the limit"):
            RemoteMiddle(client.train_stream(info)).forward(1, torch.zeros(16, 1024, 32), True, Traffic())
    stub, channel = raw_stub(strict_cloud, pki, send_limit=128 << 20)
    big = pb.EdgeMessage(session_id=info.session_id, step=1, phase=pb.FORWARD_TRAIN,
                         tensor=pb.TensorChunk(name="h", dtype="float32", data=b"\0" * (65 << 20)))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Train(iter([big]), timeout=60))
    channel.close()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert healthy_step(strict_cloud, pki) > 0


def test_stalled_client_is_cut_off_while_others_train(strict_cloud, pki):
    with secure_channel(strict_cloud.address, pki / "clients" / "bob") as channel:
        info = CloudClient(channel).open_session("split")
    stub, channel = raw_stub(strict_cloud, pki, "bob")
    first = next(tensor_chunks("h", torch.zeros(4, 64, 32), chunk_bytes=1024))
    release = threading.Event()

    def stalling():
        yield serde.edge_message_to_proto(EdgeMessage(info.session_id, 1, Phase.FORWARD_TRAIN, first))
        release.wait(30)  # never sends the rest of the tensor

    started = time.perf_counter()
    result = {}

    def run():
        try:
            list(stub.Train(stalling(), timeout=30))
        except grpc.RpcError as err:
            result["code"], result["details"] = err.code(), err.details()
        result["after_s"] = time.perf_counter() - started

    thread = threading.Thread(target=run)
    thread.start()
    assert healthy_step(strict_cloud, pki) > 0  # alice is served meanwhile
    thread.join(timeout=20)
    release.set()
    channel.close()
    assert result["code"] == grpc.StatusCode.DEADLINE_EXCEEDED and "idle timeout" in result["details"]
    assert 1.5 < result["after_s"] < 15


def test_per_client_stream_limit(strict_cloud, pki):
    with secure_channel(strict_cloud.address, pki / "clients" / "bob") as channel:
        client = CloudClient(channel)
        info = client.open_session("split")
        streams = [client.train_stream(info) for _ in range(2)]
        for s in streams:  # occupy both slots with a real step each
            RemoteMiddle(s).forward(1, torch.zeros(1, 3, 32), False, Traffic())
        with pytest.raises(CloudCallError, match="RESOURCE_EXHAUSTED.*already has 2 training streams"):
            RemoteMiddle(client.train_stream(info)).forward(1, torch.zeros(1, 3, 32), False, Traffic())
        for s in streams:
            s.close()
    assert healthy_step(strict_cloud, pki, "bob") > 0  # slots are released when streams end


def test_random_messages_over_real_streams(strict_cloud, pki):
    rng = random.Random(0)
    stub, channel = raw_stub(strict_cloud, pki)
    codes = set()
    for _ in range(40):
        messages = [pb.EdgeMessage(session_id=rng.choice(["", "se-x", "x" * 100]), step=rng.randrange(2**63),
                                   phase=rng.randrange(9),
                                   tensor=pb.TensorChunk(name="h", dtype=rng.choice(["float32", "int8", "?"]),
                                                         shape=[rng.randrange(-2, 9) for _ in range(rng.randrange(4))],
                                                         total_bytes=rng.randrange(2**20), offset=rng.randrange(64),
                                                         data=os.urandom(rng.randrange(256))))
                    for _ in range(rng.randrange(1, 5))]
        try:
            list(stub.Train(iter(messages), timeout=10))
        except grpc.RpcError as err:
            codes.add(err.code())
    channel.close()
    assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    assert strict_cloud.process.poll() is None and healthy_step(strict_cloud, pki) > 0
    log = strict_cloud.log.read_text()
    assert "Train refused (INVALID_ARGUMENT)" in log or "Train refused (NOT_FOUND)" in log
