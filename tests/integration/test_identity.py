"""Identity lifecycle against a running coordinator: revocation without restart, expiry."""

import datetime as dt

import pytest

from edge.client import CloudCallError, CloudClient
from protocol.channel import secure_channel
from protocol.pki import PkiError, issue_client, revoke_client

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


def test_expired_certificate_fails_the_handshake(tiny_cloud, pki):
    stale = issue_client(pki, "stale", days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    with secure_channel(tiny_cloud.address, stale) as channel:
        with pytest.raises(CloudCallError, match="UNAVAILABLE"):
            CloudClient(channel).list_adapters()
