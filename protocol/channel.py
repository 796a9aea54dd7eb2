"""Channel, server and credential construction: mutual TLS always, in one place.

Both ends raise gRPC's 4 MiB default message limits (tensors are chunked anyway, see
``protocol.tensors``). Root certificates are always passed explicitly, never taken from the
environment. Retries use capped, jittered exponential backoff on UNAVAILABLE and DEADLINE_EXCEEDED only.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc

from protocol.credentials import CredentialError, TlsFiles, check_identity, client_tls, server_tls
from protocol.retry import Backoff, retry

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TLS_FAILURES = ("handshake", "verification check failed", "certificate")
T = TypeVar("T")
__all__ = ["CredentialError", "TlsFiles", "client_tls", "server_tls", "secure_channel", "create_server", "with_retry"]


def create_server(pki_dir: Path, listen: str, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A gRPC server that requires client certificates signed by the PKI's CA.

    Returns:
        The (not yet started) server and the bound port (useful with ``127.0.0.1:0``).
    """
    tls = server_tls(pki_dir)
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                        require_client_auth=True)
    # gRPC sets SO_REUSEPORT by default, so a second coordinator on a busy port would silently take
    # half of its connections; a coordinator must own its port.
    options = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    probe_bind(listen)  # a clear message before gRPC core logs its own
    try:
        port = server.add_secure_port(listen, creds)
    except RuntimeError:  # gRPC's "Failed to bind": the port is taken or the address is not ours
        port = 0
    if port == 0:
        raise OSError(f"--listen {listen}: cannot listen there: another process holds the port, or the host is "
                      "not an address of this machine; pick a free port (HOST:0 picks one)")
    return server, port


def probe_bind(listen: str) -> None:
    """Binds ``HOST:PORT`` once with a plain socket (``SO_REUSEADDR`` like gRPC, never ``SO_REUSEPORT``).

    Raises:
        OSError: one line naming ``--listen`` and the fix: the port is held by another process, or the
            host is not an address of this machine.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return  # port 0 always binds; anything else unparsable is gRPC's to reject
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise OSError(f"--listen {listen}: host {host!r} does not resolve; give an address of this machine") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise OSError(f"--listen {listen}: another process already listens on this port; pick a free port "
                              "(HOST:0 picks one) or stop the other process") from None
            raise OSError(f"--listen {listen}: cannot bind ({err.strerror or err}); give an address of this machine "
                          "(0.0.0.0 for all of them) and a port you may use") from None


@contextmanager
def secure_channel(target: str, identity_dir: Path) -> Iterator[grpc.Channel]:
    """A mutual-TLS channel to the coordinator, closed on exit; checks the identity files first."""
    check_identity(identity_dir)
    tls = client_tls(identity_dir)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                         certificate_chain=tls.cert)
    channel = grpc.secure_channel(target, creds, options=GRPC_OPTIONS)
    try:
        yield channel
    finally:
        channel.close()


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The caller's identity: the subject common name of its verified client certificate."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None


def _retryable(err: grpc.RpcError) -> bool:
    # A failed TLS handshake is reported as UNAVAILABLE, but a certificate problem never heals by waiting.
    details = (err.details() if hasattr(err, "details") else "") or ""
    return err.code() in RETRYABLE and not any(m in details.lower() for m in TLS_FAILURES)


def with_retry(call: Callable[[], T], attempts: int = 6, base_s: float = 0.25, cap_s: float = 8.0,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Runs ``call``, retrying UNAVAILABLE/DEADLINE_EXCEEDED with the one policy (:mod:`protocol.retry`)."""
    return retry(call, lambda err: isinstance(err, grpc.RpcError) and _retryable(err),
                 Backoff(attempts, base_s, cap_s), sleep=sleep)
