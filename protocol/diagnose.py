"""Plain-language diagnosis of TLS set-up mistakes, naming the file at fault and the fix.

gRPC reports every handshake problem as ``UNAVAILABLE``; these checks find out which one it was:
an identity whose key does not match its certificate, an expired certificate, a server signed by
another CA, a server certificate that does not name the host, or a client the server refused.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509

from protocol.credentials import CredentialError, check_identity, check_validity

__all__ = ["check_identity", "diagnose_connection"]


def diagnose_connection(target: str, identity_dir: Path, timeout: float = 5.0) -> str:
    """Explains why a mutual-TLS connection to ``target`` fails (or says that TLS looks fine)."""
    try:
        check_identity(identity_dir)
    except CredentialError as err:
        return str(err)
    host, _, port = target.rpartition(":")
    try:
        server_cert = _server_certificate(host, int(port), identity_dir, timeout)
    except OSError as err:
        return f"cannot reach {target} ({err.strerror or err}); is `edgetune-cloud serve` running there?"
    ca = x509.load_pem_x509_certificate((identity_dir / "ca.crt").read_bytes())
    try:
        server_cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001
        return (f"the server at {target} presents a certificate not signed by {identity_dir / 'ca.crt'}: this "
                "identity belongs to another PKI; ask this server's owner for an identity")
    names = _names(server_cert)
    if host not in names:
        return (f"the server certificate is valid for {', '.join(sorted(names))}, not {host!r}; connect to one of "
                "those names or re-create the server certificate with `pki init --hosts`")
    try:
        check_validity(server_cert, Path("server.crt"), None)
    except CredentialError:
        return f"the server certificate at {target} has expired; its owner must renew it (`pki init`)"
    return (f"TLS with {target} looks right from here, but the server refused {identity_dir / 'client.crt'}: "
            "it may be revoked or issued by an older CA; ask for a new identity")


def _server_certificate(host: str, port: int, identity_dir: Path, timeout: float) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only want to look at what the server presents
    context.load_cert_chain(identity_dir / "client.crt", identity_dir / "client.key")
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise OSError("no certificate presented")
    return x509.load_der_x509_certificate(der)


def _names(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(sans.get_values_for_type(x509.DNSName)) | {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
