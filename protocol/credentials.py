"""An edge's or a server's TLS files: reading them, and checking an identity offline.

Both :mod:`protocol.channel` (which checks an identity before it connects) and :mod:`protocol.diagnose`
(which explains a failed handshake) build on this module; neither imports the other.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization


class CredentialError(ValueError):
    """A certificate or key file that is missing or unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of one side's TLS identity and the CA it trusts."""

    ca: bytes
    cert: bytes
    key: bytes


def _read(path: Path, what: str, fix: str) -> bytes:
    if not path.is_file():
        raise CredentialError(f"{path}: {what} not found; {fix}")
    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        raise CredentialError(f"{path}: not a PEM file; {fix}")
    try:  # a damaged file fails here with its name, not later inside gRPC's TLS with none
        if path.suffix == ".key":
            serialization.load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificate(data)
    except (ValueError, TypeError):
        raise CredentialError(f"{path}: damaged {what} (its PEM block does not parse); {fix}") from None
    return data


def client_tls(identity_dir: Path) -> TlsFiles:
    """Reads ``ca.crt``, ``client.crt`` and ``client.key`` of an edge identity directory."""
    fix = "pass --identity DIR/clients/NAME as written by `edgetune-cloud pki issue DIR NAME`"
    return TlsFiles(_read(identity_dir / "ca.crt", "CA certificate", fix),
                    _read(identity_dir / "client.crt", "client certificate", fix),
                    _read(identity_dir / "client.key", "client key", fix))


def server_tls(pki_dir: Path) -> TlsFiles:
    """Reads ``ca.crt``, ``server.crt`` and ``server.key`` of a PKI directory."""
    fix = f"run `edgetune-cloud pki init {pki_dir}` first"
    return TlsFiles(_read(pki_dir / "ca.crt", "CA certificate", fix),
                    _read(pki_dir / "server.crt", "server certificate", fix),
                    _read(pki_dir / "server.key", "server key", fix))


def check_identity(identity_dir: Path, now: dt.datetime | None = None) -> None:
    """Checks an edge identity offline: key matches certificate, validity period, issuing CA.

    Raises:
        CredentialError: naming the file and what to do.
    """
    tls = client_tls(identity_dir)
    cert = x509.load_pem_x509_certificate(tls.cert)
    key = serialization.load_pem_private_key(tls.key, password=None)
    if _public(key.public_key()) != _public(cert.public_key()):
        raise CredentialError(f"{identity_dir / 'client.key'} does not belong to {identity_dir / 'client.crt'}; "
                              "keep the files of one `pki issue` together")
    check_validity(cert, identity_dir / "client.crt", now)
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(tls.ca))
    except (ValueError, TypeError, Exception) as err:  # noqa: BLE001 - any failure means "not this CA"
        raise CredentialError(f"{identity_dir / 'client.crt'} is not signed by {identity_dir / 'ca.crt'} "
                              f"({type(err).__name__}); re-issue the identity from the server's PKI") from None


def check_validity(cert: x509.Certificate, path: Path, now: dt.datetime | None) -> None:
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise CredentialError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask for a new identity "
                              "(`edgetune-cloud pki revoke` then `pki issue` on the cloud host)")
    if now < cert.not_valid_before_utc:
        raise CredentialError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}; check the clock")


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
