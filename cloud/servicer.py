"""The gRPC servicer: decode, call a handler with the caller's TLS identity, encode. Nothing else."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from cloud import errors
from cloud.auth import Authenticator
from cloud.handlers import Coordinator
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
}


def _abort(context: grpc.ServicerContext, err: errors.CloudError, rpc: str) -> None:
    code = STATUS.get(type(err), grpc.StatusCode.INTERNAL)
    log.warning("%s refused (%s): %s", rpc, code.name, err)
    context.abort(code, str(err))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Maps the Coordinator service onto :class:`cloud.handlers.Coordinator`."""

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
            for message in request_iterator:
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


