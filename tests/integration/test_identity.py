"""Identity lifecycle against a running coordinator: revocation without restart, expiry."""

import datetime as dt
import shutil
import subprocess
import sys

import grpc
import pytest

from edge.rpc.client import CloudCallError, CloudClient
from protocol import edgetune_pb2 as pb
from protocol import edgetune_pb2_grpc as pb_grpc
from protocol.channel import GRPC_OPTIONS, CredentialError, secure_channel
from protocol.diagnose import check_identity
from protocol.pki import PkiError, init_pki, issue_client, revoke_client
from tests.conftest import REPO, start_cloud, stop_cloud
from tests.tiny_models import save_tiny

pytestmark = pytest.mark.integration


def test_revoked_identity_is_refused_at_next_call_and_can_be_reissued(tiny_cloud, pki):
    carol = issue_client(pki, "carol")
    with secure_channel(tiny_cloud.address, carol) as channel:
        assert CloudClient(channel).list_adapters() == []
    with secure_channel(tiny_cloud.address, carol) as channel:
        client = CloudClient(channel)
        revoke_client(pki, "carol")  # same channel, no server restart
        with pytest.raises(CloudCallError, match="PERMISSION_DENIED.*'carol' has been revoked"):
            client.list_adapters()
    assert not (pki / "clients" / "carol").exists()
    with pytest.raises(PkiError, match="no such identity"):
        revoke_client(pki, "carol")
    fresh = issue_client(pki, "carol")  # a new key and serial
    with secure_channel(tiny_cloud.address, fresh) as channel:
        assert CloudClient(channel).list_adapters() == []


def test_expired_certificate_is_refused_by_client_and_server(tiny_cloud, pki):
    stale = issue_client(pki, "stale", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(CredentialError, match=r"stale/client.crt expired on .*ask for a new identity"):
        with secure_channel(tiny_cloud.address, stale):
            pass
    creds = grpc.ssl_channel_credentials(root_certificates=(stale / "ca.crt").read_bytes(),
                                         private_key=(stale / "client.key").read_bytes(),
                                         certificate_chain=(stale / "client.crt").read_bytes())
    channel = grpc.secure_channel(tiny_cloud.address, creds, options=GRPC_OPTIONS)
    with pytest.raises(grpc.RpcError) as err:  # the server enforces expiry at the handshake too
        pb_grpc.CoordinatorStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=10)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def edge_list(address, identity):
    return subprocess.run([sys.executable, "-m", "edge.cli", "list", "--cloud", address, "--identity", str(identity)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_identity_from_another_pki_is_diagnosed(tiny_cloud, tmp_path):
    init_pki(tmp_path, ["127.0.0.1"])
    foreign = issue_client(tmp_path, "alice")
    proc = edge_list(tiny_cloud.address, foreign)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not signed by" in proc.stderr and "another PKI" in proc.stderr


def test_wrong_host_name_is_diagnosed(tmp_path):
    init_pki(tmp_path / "pki", ["cloud.example"])
    identity = issue_client(tmp_path / "pki", "alice")
    cloud = start_cloud(str(save_tiny(tmp_path / "model", "llama")), tmp_path / "pki", tmp_path / "store")
    try:
        proc = edge_list(cloud.address, identity)
    finally:
        stop_cloud(cloud)
    assert proc.returncode == 2
    assert "valid for cloud.example, not '127.0.0.1'" in proc.stderr


def test_local_identity_mistakes_name_the_file(pki, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pki / "clients" / "alice", broken)
    shutil.copy(pki / "clients" / "bob" / "client.key", broken / "client.key")
    with pytest.raises(CredentialError, match=r"broken/client.key does not belong to .*broken/client.crt"):
        check_identity(broken)
    (broken / "client.key").unlink()
    proc = edge_list("127.0.0.1:1", broken)
    assert proc.returncode == 2 and "broken/client.key: client key not found" in proc.stderr
