import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from protocol.channel import CredentialError, client_tls
from protocol.pki import PkiError, init_pki, issue_client


def test_init_and_issue(tmp_path):
    init_pki(tmp_path, ["localhost", "127.0.0.1"])
    out = issue_client(tmp_path, "alice")
    cert = x509.load_pem_x509_certificate((out / "client.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    assert client_tls(out).ca == (tmp_path / "ca.crt").read_bytes()


def test_refusals(tmp_path):
    with pytest.raises(PkiError, match="no CA found"):
        issue_client(tmp_path, "alice")
    init_pki(tmp_path, ["localhost"])
    with pytest.raises(PkiError, match="refusing to replace"):
        init_pki(tmp_path, ["localhost"])
    issue_client(tmp_path, "alice")
    with pytest.raises(PkiError, match="already issued"):
        issue_client(tmp_path, "alice")
    with pytest.raises(PkiError, match="must be 1-64"):
        issue_client(tmp_path, "../evil")
    with pytest.raises(CredentialError, match="client.key: client key not found"):
        (tmp_path / "clients" / "alice" / "client.key").unlink()
        client_tls(tmp_path / "clients" / "alice")
