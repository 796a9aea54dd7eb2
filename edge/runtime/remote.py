"""The cloud's middle over the training stream, for an edge that holds numpy arrays and no torch.

The same session and messages as :class:`edge.modes.split.RemoteMiddle` in evaluation: the edge opens a
split session for its export's K edge layers, sends the hidden state at the lower cut as
``FORWARD_EVAL`` and gets the hidden state at the upper cut back, in the wire format of
:mod:`protocol.ndarrays` (byte-identical to :mod:`protocol.tensors`).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

import grpc
import numpy as np

from protocol import edgetune_pb2_grpc as pb_grpc
from protocol import serde
from protocol.accounting import Traffic
from protocol.channel import with_retry
from protocol.ndarrays import ArrayAssembler, array_chunks
from protocol.types import EdgeMessage, OpenSessionRequest, Phase, SessionInfo

_END = object()


class RemoteError(RuntimeError):
    """The cloud refused or failed a call; ``code`` is the gRPC status (None when the stream just ended)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _rpc_error(rpc: str, err: grpc.RpcError) -> RemoteError:
    code = err.code() if hasattr(err, "code") else None
    detail = err.details() if hasattr(err, "details") else str(err)
    return RemoteError(f"{rpc} failed ({code.name if code else 'UNKNOWN'}): {detail}", code)


def open_split_session(channel: grpc.Channel, edge_layers: int, traffic: Traffic) -> SessionInfo:
    """Opens a split session for ``edge_layers`` K; ``traffic`` counts the request and the reply."""
    request = serde.open_session_to_proto(OpenSessionRequest("split", edge_layers))
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        reply = with_retry(lambda: stub.OpenSession(request, timeout=600))
    except grpc.RpcError as err:
        raise _rpc_error("OpenSession", err) from None
    traffic.sent(request.ByteSize(), 0)
    traffic.received(reply.ByteSize(), 0)
    return serde.session_info_from_proto(reply)


@dataclass
class ArrayMiddle:
    """Calls the cloud's middle blocks on numpy hidden states over one long-lived stream."""

    channel: grpc.Channel
    session_id: str
    traffic: Traffic
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = pb_grpc.CoordinatorStub(self.channel).Train(iter(self._requests.get, _END))

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        """``(batch, seq, hidden)`` at the lower cut -> the same shape at the upper cut (float32)."""
        for chunk in array_chunks("hidden", hidden, self.wire_dtype):
            message = serde.edge_message_to_proto(EdgeMessage(self.session_id, 0, Phase.FORWARD_EVAL, chunk))
            self.traffic.sent(message.ByteSize(), len(chunk.data))
            self._requests.put(message)
        assembler = ArrayAssembler()
        try:
            for reply in self._responses:
                self.traffic.received(reply.ByteSize(), len(reply.tensor.data))
                answer = serde.cloud_message_from_proto(reply)
                if answer.step != 0 or answer.tensor is None:
                    raise RemoteError(f"Train: the cloud answered step {answer.step} without a tensor")
                result = assembler.feed(answer.tensor)
                if result is not None:
                    self.traffic.round_trips += 1
                    return result
        except grpc.RpcError as err:
            raise _rpc_error("Train", err) from None
        raise RemoteError("Train: the cloud closed the stream mid-step; is the coordinator running?")

    def close(self) -> None:
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass
