"""The gRPC servicer: decode, call a handler with the caller's TLS identity, encode. Nothing else."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from cloud import errors
from cloud.rpc.auth import Authenticator
from cloud.rpc.handlers import Coordinator
from protocol import edgetune_pb2_grpc as pb_grpc
from protocol import serde

log = logging.getLogger("edgetune.cloud")
T = TypeVar("T")

STATUS: dict[type[errors.CloudError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,  # the edge retries the step
}


def _abort(context: grpc.ServicerContext, err: errors.CloudError, rpc: str) -> None:
    code = STATUS.get(type(err), grpc.StatusCode.INTERNAL)
    log.warning("%s refused (%s): %s", rpc, code.name, err)
    context.abort(code, str(err))


def with_idle_timeout(requests: Iterator[T], seconds: float) -> Iterator[T]:
    """Yields from a request stream, raising DeadlineExceeded when the client is silent too long."""
    inbox: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def pump() -> None:
        try:
            for item in requests:
                inbox.put(item)
        except Exception:  # noqa: BLE001 - the RPC ended (cancelled or broken); stop reading
            pass
        inbox.put(done)

    threading.Thread(target=pump, daemon=True, name="stream-reader").start()
    while True:
        try:
            item = inbox.get(timeout=seconds)
        except queue.Empty:
            raise errors.DeadlineExceeded(f"no message for {seconds:g} s (idle timeout); reconnect to continue "
                                          "the session") from None
        if item is done:
            return
        yield item


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Maps the Coordinator service onto :class:`cloud.rpc.handlers.Coordinator`."""

    def __init__(self, coordinator: Coordinator, auth: Authenticator) -> None:
        self.c = coordinator
        self.auth = auth

    def _unary(self, rpc: str, context: grpc.ServicerContext, call: Callable[[str], T]) -> T:
        try:
            return call(self.auth.identity(context))
        except errors.CloudError as err:
            _abort(context, err, rpc)
            raise AssertionError("unreachable") from err

    def _streaming(self, rpc: str, context: grpc.ServicerContext,
                   call: Callable[[str], Iterator[T]]) -> Iterator[T]:
        try:
            yield from call(self.auth.identity(context))
        except errors.CloudError as err:
            _abort(context, err, rpc)

    def OpenSession(self, request, context):  # noqa: N802 - gRPC method names
        return self._unary("OpenSession", context, lambda who: serde.session_info_to_proto(
            self.c.open_session(who, serde.open_session_from_proto(request))))

    def FetchBundle(self, request, context):  # noqa: N802
        return self._streaming("FetchBundle", context, lambda who: (
            serde.file_chunk_to_proto(c) for c in self.c.fetch_bundle(who, request.bundle_id)))

    def Train(self, request_iterator, context):  # noqa: N802
        def decoded():
            for message in with_idle_timeout(request_iterator, self.c.limits.idle_timeout_s):
                try:
                    yield serde.edge_message_from_proto(message)
                except serde.WireFormatError as err:
                    raise errors.InvalidArgument(str(err)) from None

        return self._streaming("Train", context, lambda who: (
            serde.cloud_message_to_proto(m) for m in self.c.train(who, decoded())))

    def RegisterAdapter(self, request_iterator, context):  # noqa: N802
        return self._unary("RegisterAdapter", context, lambda who: serde.adapter_meta_to_proto(
            self.c.register_adapter(who, (serde.adapter_upload_from_proto(m) for m in request_iterator))))

    def ListAdapters(self, request, context):  # noqa: N802
        return self._unary("ListAdapters", context, lambda who: serde.adapter_list_to_proto(
            self.c.list_adapters(who)))

    def PullAdapter(self, request, context):  # noqa: N802
        return self._streaming("PullAdapter", context, lambda who: (
            serde.file_chunk_to_proto(c) for c in self.c.pull_adapter(who, request.adapter_id)))

    def NextRound(self, request, context):  # noqa: N802
        return self._unary("NextRound", context, lambda who: serde.round_task_to_proto(
            self.c.next_round(who, serde.round_request_from_proto(request))))

    def SubmitUpdate(self, request_iterator, context):  # noqa: N802
        return self._unary("SubmitUpdate", context, lambda who: serde.adapter_meta_to_proto(
            self.c.submit_update(who, (serde.adapter_upload_from_proto(m) for m in request_iterator))))


def add_to_server(coordinator: Coordinator, auth: Authenticator, server: grpc.Server) -> None:
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coordinator, auth), server)


