"""Split training over real mutual TLS against a coordinator running as a separate process."""

import copy
import json
import subprocess
import sys

import grpc
import pytest
import torch
from peft import PeftModel

from edge.modes.split import LocalMiddle, RemoteMiddle, split_logits, split_step
from edge.rpc.client import CloudCallError, CloudClient
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters, with_adapter
from emulator.model.arch import arch_for
from emulator.model.bundle import load_edge_model
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol import edgetune_pb2 as pb
from protocol import edgetune_pb2_grpc as pb_grpc
from protocol.accounting import Traffic
from protocol.channel import GRPC_OPTIONS, secure_channel
from protocol.pki import init_pki, issue_client
from tests.conftest import REPO
from tests.edge.test_split_equivalence import make_batch
from tests.tiny_models import write_toy_sentiment

pytestmark = pytest.mark.integration


def identity(pki, name):
    return pki / "clients" / name


def test_split_step_over_grpc_equals_local_step(tiny_cloud, pki, tiny_dirs, tmp_path, monkeypatch):
    # An empty bundle cache of this test's own: another test may have cached this bundle already.
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    full = load_causal_lm(tiny_dirs["llama"])
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        info = client.open_session("split", 2)
        edge = load_edge_model(client.bundle(info))
        assert client.setup.payload_bytes_received > 0
        spec = arch_for(full.config)
        remote_model = add_lora(edge, LoraSettings(rank=4, alpha=8), spec)
        torch.manual_seed(5)
        for p in lora_parameters(remote_model).values():
            torch.nn.init.normal_(p, std=0.1)
        local_model = copy.deepcopy(remote_model)
        ids, labels = make_batch()
        traffic = Traffic()
        stream = client.train_stream(info)
        remote = split_step(remote_model, RemoteMiddle(stream), 1, ids, labels, traffic)
        stream.close()
    local = split_step(local_model, LocalMiddle(extract_middle(full, plan_for(full.config, 2))), 1, ids, labels,
                       Traffic())
    assert remote.loss == pytest.approx(local.loss, rel=1e-6)
    for (name, p), q in zip(lora_parameters(remote_model).items(), lora_parameters(local_model).values()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Payload formula: hidden up + gradient up, hidden down + gradient down, each B*S*H*4 bytes.
    b, s = ids.shape
    per_crossing = b * s * full.config.hidden_size * 4
    assert traffic.payload_bytes_sent == traffic.payload_bytes_received == 2 * per_crossing
    assert traffic.round_trips == 2
    assert traffic.bytes_sent > traffic.payload_bytes_sent  # framing is counted too
    assert remote.compute_s > 0


@pytest.fixture(scope="module")
def alice_run(tiny_cloud, pki, tmp_path_factory):
    """``edgetune-edge train`` run once by alice, as a real process; returns (run dir, stdout)."""
    tmp_path = tmp_path_factory.mktemp("alice")
    write_toy_sentiment(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "train", "--cloud", tiny_cloud.address, "--identity",
         str(identity(pki, "alice")), "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
         "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "0",
         "--out", str(run), "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run, proc.stdout


def test_train_cli_metrics_pull_and_peft_logits(alice_run, tiny_cloud, pki, tiny_dirs, tmp_path):
    run, stdout = alice_run
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("adapter_id", "mode", "steps", "tokens", "loss_first", "loss_last", "bytes_sent", "bytes_received",
                "payload_bytes_sent", "payload_bytes_received", "round_trips", "edge_flops", "cloud_compute_s",
                "wall_s", "edge_peak_rss_mb", "eval_accuracy_before", "eval_accuracy_after", "per_step"):
        assert key in metrics, key
    assert metrics["steps"] == 4 and len(metrics["per_step"]) == 4 and metrics["round_trips"] == 8
    assert metrics["edge_flops"] > 0 and metrics["cloud_compute_s"] > 0
    hidden = 32
    for step in metrics["per_step"]:
        assert step["payload_bytes_sent"] == 2 * step["tokens"] * hidden * 4
    assert sum(s["bytes_sent"] for s in metrics["per_step"]) == metrics["bytes_sent"]
    assert metrics["eval_bytes_sent"] > 0  # evaluation is accounted separately
    adapter_id = metrics["adapter_id"]
    assert adapter_id in stdout

    pulled = tmp_path / "pulled"
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        assert adapter_id in [m.adapter_id for m in client.list_adapters()]
        client.pull_adapter(adapter_id, pulled)
        info = client.open_session("split", 2)
        edge = load_edge_model(client.bundle(info))
        model = with_adapter(edge, pulled, edge.bottom.spec)
        stream = client.train_stream(info)
        ids = torch.randint(1, 96, (2, 10))
        split_out = split_logits(model, RemoteMiddle(stream), ids, Traffic())
        stream.close()
    weights = "adapter_model.safetensors"
    assert (pulled / weights).read_bytes() == (run / "adapter" / weights).read_bytes()
    full = PeftModel.from_pretrained(load_causal_lm(tiny_dirs["llama"]), str(pulled)).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, split_out, rtol=1e-5, atol=1e-5)


def test_other_client_cannot_see_pull_or_continue(alice_run, tiny_cloud, pki, tmp_path):
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        alice = CloudClient(channel)
        session = alice.open_session("split", 2)
        adapters = alice.list_adapters()
    with secure_channel(tiny_cloud.address, identity(pki, "bob")) as channel:
        bob = CloudClient(channel)
        assert bob.list_adapters() == []
        for meta in adapters:
            with pytest.raises(CloudCallError, match="NOT_FOUND") as err:
                bob.pull_adapter(meta.adapter_id, tmp_path / "stolen")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        stream = bob.train_stream(session)
        with pytest.raises(CloudCallError, match="no session .* belongs to identity 'bob'"):
            RemoteMiddle(stream).forward(1, torch.zeros(1, 4, 32), True, Traffic())
    assert adapters


def _raw_call(address, creds):
    channel = grpc.secure_channel(address, creds, options=GRPC_OPTIONS)
    try:
        return pb_grpc.CoordinatorStub(channel).ListAdapters(pb.ListAdaptersRequest(), timeout=10)
    finally:
        channel.close()


def test_client_without_certificate_is_rejected(tiny_cloud, pki):
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(tiny_cloud.address, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_signed_by_another_ca_is_rejected(tiny_cloud, pki, tmp_path):
    init_pki(tmp_path, ["localhost"])
    rogue = issue_client(tmp_path, "alice")  # same name, wrong authority
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.crt").read_bytes(),
                                         private_key=(rogue / "client.key").read_bytes(),
                                         certificate_chain=(rogue / "client.crt").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _raw_call(tiny_cloud.address, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_invalid_hidden_shape_gets_clear_status(tiny_cloud, pki):
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        info = client.open_session("split", 2)
        stream = client.train_stream(info)
        with pytest.raises(CloudCallError, match=r"INVALID_ARGUMENT.*must be \(batch, seq, 32\)"):
            RemoteMiddle(stream).forward(1, torch.zeros(1, 4, 7), True, Traffic())
        stream = client.train_stream(info)
        with pytest.raises(CloudCallError, match="FAILED_PRECONDITION"):
            RemoteMiddle(stream).backward(3, torch.zeros(1, 4, 32), Traffic())


def test_eval_cli_reproduces_accuracy_after_training(alice_run, tiny_cloud, pki):
    run, _ = alice_run
    metrics = json.loads((run / "metrics.json").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "eval", "--cloud", tiny_cloud.address, "--identity",
         str(identity(pki, "alice")), "--data", str(run.parent / "eval.jsonl"), "--adapter", str(run / "adapter"),
         "--seq-len", "32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["eval_accuracy"] == metrics["eval_accuracy_after"]
    assert report["eval_rows"] == 6


def test_two_clients_train_concurrently_without_cross_talk(tiny_cloud, pki, tiny_dirs):
    import threading

    full = load_causal_lm(tiny_dirs["llama"])
    local = LocalMiddle(extract_middle(full, plan_for(full.config, 2)))
    results, errors = {}, []

    def client(name, seed):
        try:
            with secure_channel(tiny_cloud.address, identity(pki, name)) as channel:
                c = CloudClient(channel)
                info = c.open_session("split", 2)
                model = add_lora(load_edge_model(c.bundle(info)), LoraSettings(rank=4, alpha=8), arch_for(full.config))
                stream = c.train_stream(info)
                losses = []
                for step in range(1, 4):
                    ids, labels = make_batch(seed=seed * 10 + step)
                    losses.append(split_step(model, RemoteMiddle(stream), step, ids, labels, Traffic()).loss)
                stream.close()
                results[name] = losses
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n, s)) for n, s in (("alice", 1), ("bob", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for name, seed in (("alice", 1), ("bob", 2)):
        model = add_lora(load_edge_model(next(iter((tiny_cloud.store / "bundles").iterdir()))),
                         LoraSettings(rank=4, alpha=8), arch_for(full.config))
        expected = [split_step(model, local, step, *make_batch(seed=seed * 10 + step), Traffic()).loss
                    for step in range(1, 4)]  # no optimizer step: every loss is checkable
        assert results[name] == pytest.approx(expected, rel=1e-6)
