"""A small certificate authority for edgetune identities (``cryptography`` package).

Layout of a PKI directory::

    DIR/ca.crt, DIR/ca.key             the authority (keep ca.key on the cloud host only)
    DIR/server.crt, DIR/server.key     the coordinator's TLS identity
    DIR/clients/NAME/{ca.crt,client.crt,client.key}   one edge identity, to hand to its owner
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.fileio import atomic_write

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_DAYS = 365


class PkiError(ValueError):
    """A PKI operation that cannot proceed; the message says which file and what to do."""


def init_pki(directory: Path, hosts: list[str], days: int = DEFAULT_DAYS) -> None:
    """Creates a CA and a server certificate valid for ``hosts`` (DNS names or IP addresses)."""
    if (directory / "ca.key").exists():
        raise PkiError(f"{directory / 'ca.key'} exists; refusing to replace an existing CA "
                       "(remove the directory to start over)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetune CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    _write_cert(directory / "ca.crt", ca_cert)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "server.key", server_key)
    _write_cert(directory / "server.crt", server_cert)


def issue_client(directory: Path, name: str, days: int = DEFAULT_DAYS,
                 not_before: dt.datetime | None = None) -> Path:
    """Issues a client identity ``NAME`` and returns ``DIR/clients/NAME``.

    ``not_before`` back-dates the certificate (tests use it to make one that has already expired).
    """
    if not _NAME.match(name):
        raise PkiError(f"client name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    ca_key_path, ca_cert_path = directory / "ca.key", directory / "ca.crt"
    if not ca_key_path.is_file() or not ca_cert_path.is_file():
        raise PkiError(f"{directory}: no CA found; run `edgetune-cloud pki init {directory}` first")
    out = directory / "clients" / name
    if (out / "client.crt").exists():
        raise PkiError(f"{out / 'client.crt'} exists; identity {name!r} was already issued")
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days, not_before)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_key(out / "client.key", key)
    _write_cert(out / "client.crt", cert)
    (out / "ca.crt").write_bytes(ca_cert_path.read_bytes())
    return out


REVOKED = "revoked.json"


def revoke_client(directory: Path, name: str) -> int:
    """Revokes identity ``NAME``: records its serial in ``DIR/revoked.json`` and retires its files.

    A running coordinator picks the change up at the client's next call. The name can then be
    issued again (a new key and serial). Returns the revoked serial number.
    """
    cert_path = directory / "clients" / name / "client.crt"
    if not cert_path.is_file():
        raise PkiError(f"{cert_path}: no such identity; `ls {directory / 'clients'}` lists the issued ones")
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    path = directory / REVOKED
    entries = json.loads(path.read_text())["revoked"] if path.is_file() else []
    entries.append({"name": name, "serial": f"{serial:x}",
                    "revoked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    atomic_write(path, json.dumps({"revoked": entries}, indent=2).encode())
    retired = directory / "clients" / ".revoked" / f"{name}-{serial:x}"
    retired.parent.mkdir(parents=True, exist_ok=True)
    os.replace(cert_path.parent, retired)
    return serial


class RevocationList:
    """The revoked serials of ``DIR/revoked.json``, re-read whenever the file changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / REVOKED
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    def is_revoked(self, serial: int) -> bool:
        return serial in self._current()

    def _current(self) -> frozenset[int]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return frozenset()
        with self._lock:
            if stamp != self._stamp:
                entries = json.loads(self.path.read_text())["revoked"]
                self._serials = frozenset(int(e["serial"], 16) for e in entries)
                self._stamp = stamp
            return self._serials


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int,
             not_before: dt.datetime | None = None) -> x509.CertificateBuilder:
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
