"""The edge's view of the coordinator: typed calls over one mutual-TLS channel, every byte counted."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from emulator.model.loading import cache_root
from protocol import edgetune_pb2 as pb
from protocol import edgetune_pb2_grpc as pb_grpc
from protocol import serde
from protocol.accounting import Traffic
from protocol.channel import with_retry
from protocol.fileio import publish_directory
from protocol.tensors import TensorAssembler, file_chunks, receive_files, tensor_chunks
from protocol.types import (
    AdapterMeta,
    AdapterUpload,
    EdgeMessage,
    OpenSessionRequest,
    Phase,
    RoundRequest,
    RoundTask,
    SessionInfo,
)


class CloudCallError(RuntimeError):
    """The coordinator refused or failed a call; ``str(err)`` says why and what to do."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, rpc: str, err: grpc.RpcError) -> CloudCallError:
        code = err.code() if hasattr(err, "code") else None
        detail = err.details() if hasattr(err, "details") else str(err)
        return cls(f"{rpc} failed ({code.name if code else 'UNKNOWN'}): {detail}", code)


def _call(rpc: str, fn):
    try:
        return with_retry(fn)
    except grpc.RpcError as err:
        raise CloudCallError.from_rpc(rpc, err) from None


@dataclass
class CloudClient:
    """Typed calls to the Coordinator service. ``setup`` counts bundle traffic."""

    channel: grpc.Channel
    setup: Traffic = field(default_factory=Traffic)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def open_session(self, mode: str, edge_layers: int = 0, lora_targets: tuple[str, ...] = (),
                     emulator_layers: int = 0, traffic: Traffic | None = None) -> SessionInfo:
        """Opens a session; ``traffic`` (if given) counts the request and the reply."""
        request = serde.open_session_to_proto(OpenSessionRequest(mode, edge_layers, lora_targets, emulator_layers))
        reply = _call("OpenSession", lambda: self.stub.OpenSession(request, timeout=600))
        if traffic is not None:
            traffic.sent(request.ByteSize(), 0)
            traffic.received(reply.ByteSize(), 0)
        return serde.session_info_from_proto(reply)

    def bundle(self, info: SessionInfo) -> Path:
        """The local bundle directory for a session, downloading it only if not cached."""
        target = cache_root() / "bundles" / info.model.bundle_id
        if target.is_dir() and (target / "split.json").is_file():
            return target

        def fill(tmp: Path) -> Path:
            def fetch() -> list[str]:
                request = pb.FetchBundleRequest(bundle_id=info.model.bundle_id)
                self.setup.sent(request.ByteSize(), 0)
                return receive_files(self._count(self.stub.FetchBundle(request), self.setup), tmp)
            _call("FetchBundle", fetch)
            return target

        return publish_directory(target.parent, fill)

    def register_adapter(self, directory: Path, meta: AdapterMeta, traffic: Traffic | None = None) -> AdapterMeta:
        """Uploads an adapter directory; ``traffic`` (if given) counts the upload and the reply."""
        counted = traffic if traffic is not None else Traffic()
        reply = _call("RegisterAdapter", lambda: self.stub.RegisterAdapter(
            _uploads(directory, meta, counted), timeout=600))
        counted.received(reply.ByteSize(), 0)
        return serde.adapter_meta_from_proto(reply)

    def submit_update(self, directory: Path, meta: AdapterMeta, traffic: Traffic | None = None) -> AdapterMeta:
        """Uploads a federated round's update (``meta`` names job, round and example count)."""
        counted = traffic if traffic is not None else Traffic()
        reply = _call("SubmitUpdate", lambda: self.stub.SubmitUpdate(_uploads(directory, meta, counted), timeout=600))
        counted.received(reply.ByteSize(), 0)
        return serde.adapter_meta_from_proto(reply)

    def next_round(self, after_round: int, wait_s: float = 30.0) -> RoundTask:
        request = serde.round_request_to_proto(RoundRequest(after_round, wait_s))
        reply = _call("NextRound", lambda: self.stub.NextRound(request, timeout=wait_s + 60))
        return serde.round_task_from_proto(reply)

    def list_adapters(self) -> list[AdapterMeta]:
        reply = _call("ListAdapters", lambda: self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=60))
        return serde.adapter_list_from_proto(reply).adapters

    def pull_adapter(self, adapter_id: str, out: Path, traffic: Traffic | None = None) -> list[str]:
        request = pb.PullAdapterRequest(adapter_id=adapter_id)
        counted = traffic if traffic is not None else Traffic()
        return _call("PullAdapter", lambda: receive_files(
            self._count(self.stub.PullAdapter(request, timeout=600), counted), out))

    def train_stream(self, session: SessionInfo) -> TrainStream:
        return TrainStream(self.stub, session.session_id)

    @staticmethod
    def _count(replies, traffic: Traffic):
        for reply in replies:
            traffic.received(reply.ByteSize(), len(reply.data))
            yield serde.file_chunk_from_proto(reply)


def _uploads(directory: Path, meta: AdapterMeta, traffic: Traffic) -> Iterator[pb.AdapterUpload]:
    """The upload stream of an adapter directory: metadata first, then every file in chunks."""
    first = serde.adapter_upload_to_proto(AdapterUpload(meta=meta))
    traffic.sent(first.ByteSize(), 0)
    yield first
    for path in sorted(directory.iterdir()):
        for chunk in file_chunks(path):
            message = serde.adapter_upload_to_proto(AdapterUpload(file=chunk))
            traffic.sent(message.ByteSize(), len(chunk.data))
            yield message


_END = object()


@dataclass(frozen=True)
class CloudReply:
    """One complete tensor from the cloud on the training stream."""

    phase: Phase
    tensor: torch.Tensor
    compute_s: float
    site_group: int = 0


class TrainStream:
    """One long-lived bidirectional stream for a session's training and evaluation steps."""

    def __init__(self, stub: pb_grpc.CoordinatorStub, session_id: str) -> None:
        self.session_id = session_id
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.Train(iter(self._requests.get, _END))

    def exchange(self, step: int, phase: Phase, tensor: torch.Tensor, traffic: Traffic,
                 wire_dtype: str = "float32") -> tuple[torch.Tensor, float]:
        """Sends one tensor and waits for the reply tensor; returns it and the cloud's compute seconds."""
        self.send(step, phase, tensor, traffic, wire_dtype)
        reply = self.receive(step, traffic)
        traffic.round_trips += 1
        return reply.tensor, reply.compute_s

    def send(self, step: int, phase: Phase, tensor: torch.Tensor, traffic: Traffic, wire_dtype: str = "float32",
             site_group: int = 0, active_sites: tuple[int, ...] = ()) -> None:
        """Sends one tensor in chunks; ``active_sites`` rides on the first chunk only."""
        name = "grad" if phase in (Phase.BACKWARD, Phase.SITE_GRAD_INPUT) else "hidden"
        for i, chunk in enumerate(tensor_chunks(name, tensor, wire_dtype)):
            edge_message = EdgeMessage(self.session_id, step, phase, chunk, site_group, active_sites if i == 0 else ())
            message = serde.edge_message_to_proto(edge_message)
            traffic.sent(message.ByteSize(), len(chunk.data))
            self._requests.put(message)

    def receive(self, step: int, traffic: Traffic) -> CloudReply:
        """Waits for the cloud's next complete tensor of ``step`` (a step reply or a site call-out)."""
        assembler, compute_s = TensorAssembler(), 0.0
        try:
            for reply in self._responses:
                traffic.received(reply.ByteSize(), len(reply.tensor.data))
                answer = serde.cloud_message_from_proto(reply)
                compute_s += answer.compute_s
                if answer.step != step or answer.tensor is None:
                    raise RuntimeError(f"cloud answered step {answer.step}, expected {step}")
                result = assembler.feed(answer.tensor)
                if result is not None:
                    return CloudReply(answer.phase, result, compute_s, answer.site_group)
        except grpc.RpcError as err:
            raise CloudCallError.from_rpc("Train", err) from None
        raise CloudCallError("Train: the cloud closed the stream mid-step; is the coordinator running?")

    def close(self) -> None:
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass


