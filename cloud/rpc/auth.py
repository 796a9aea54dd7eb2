"""Who is calling: the verified client certificate's common name, unless its serial is revoked."""

from __future__ import annotations

import grpc
from cryptography import x509

from cloud.errors import PermissionDenied, Unauthenticated
from protocol.channel import peer_identity
from protocol.pki import RevocationList


class Authenticator:
    """Turns a call's TLS peer into an identity; consults the revocation list on every call."""

    def __init__(self, revocations: RevocationList | None = None) -> None:
        self.revocations = revocations

    def identity(self, context: grpc.ServicerContext) -> str:
        name = peer_identity(context)
        if name is None:
            raise Unauthenticated("no verified client certificate; connect with an edgetune identity")
        if self.revocations is not None:
            pem = context.auth_context().get("x509_pem_cert")
            serial = x509.load_pem_x509_certificate(pem[0]).serial_number if pem else None
            if serial is None or self.revocations.is_revoked(serial):
                raise PermissionDenied(f"identity {name!r} has been revoked; ask the model owner for a new one")
        return name
