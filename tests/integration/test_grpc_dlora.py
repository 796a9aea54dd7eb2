"""dlora over real mutual TLS against a coordinator process: same step as in-process, real CLI run."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from edge.modes.dlora import DloraMiddle, LocalDloraMiddle, SiteServer, load_dlora_adapter, plan_bank_sites
from edge.modes.split import split_logits, split_step
from edge.rpc.client import CloudCallError, CloudClient
from emulator.adapters.lora import LoraSettings, add_lora, load_adapter_state, lora_parameters
from emulator.adapters.lora_bank import LoraBank
from emulator.model.arch import arch_for
from emulator.model.bundle import load_edge_model
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from protocol.tensors import wire_nbytes
from protocol.types import Phase
from tests.conftest import REPO
from tests.edge.test_split_equivalence import make_batch
from tests.tiny_models import write_toy_sentiment

pytestmark = pytest.mark.integration
SETTINGS = LoraSettings(rank=4, alpha=8)


def identity(pki, name):
    return pki / "clients" / name


@pytest.fixture(autouse=True)
def _own_bundle_cache(tmp_path_factory, monkeypatch):
    """A bundle cache of this module's own, so split tests still see their first download."""
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache-dlora"))


def dlora_edge(client, info, settings=SETTINGS):
    bundle = client.bundle(info)
    edge = load_edge_model(bundle)
    model = add_lora(edge, settings, edge.bottom.spec)
    bank = LoraBank(plan_bank_sites(bundle, settings.resolved_targets(edge.bottom.spec), info.remote_sites), settings)
    torch.manual_seed(5)
    for p in [*lora_parameters(model).values(), *bank.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    return model, bank


@pytest.mark.parametrize("wire", ["fp32", "int8"])
def test_dlora_step_over_grpc_equals_local_step_and_bytes_follow_the_shapes(tiny_cloud, pki, tiny_dirs, wire):
    full = load_causal_lm(tiny_dirs["llama"])
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        info = client.open_session("dlora", 2)
        assert info.remote_sites == ("model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
                                     "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj")
        remote_model, bank = dlora_edge(client, info)
        local_model, local_bank = copy.deepcopy(remote_model), copy.deepcopy(bank)
        server, local_server = SiteServer(bank), SiteServer(local_bank)
        server.active = local_server.active = frozenset({0, 1, 2})  # block 3's v_proj killed
        ids, labels = make_batch()
        traffic = Traffic()
        stream = client.train_stream(info)
        remote = split_step(remote_model, DloraMiddle(stream, server, wire), 1, ids, labels, traffic)
        stream.close()
    middle = extract_middle(full, plan_for(full.config, 2))
    local = split_step(local_model, LocalDloraMiddle(middle, local_server), 1, ids, labels, Traffic())
    tol = 1e-5 if wire == "fp32" else 3e-2
    assert remote.loss == pytest.approx(local.loss, rel=tol)
    pairs = [*zip(lora_parameters(remote_model).values(), lora_parameters(local_model).values()),
             *zip(bank.parameters(), local_bank.parameters())]
    for p, q in pairs:
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * 1e-1)
    assert bank.lora_weights(bank.sites[3])[0].grad is None
    # Two cut crossings plus one exchange per direction per block with an active site.
    b, s = ids.shape
    hidden, q_out, v_out = 32, 32, 16
    n = {"fp32": "float32", "int8": "int8"}[wire]
    cut = 2 * wire_nbytes(n, (b, s, hidden))
    sites = wire_nbytes(n, (b, s, q_out + v_out)) + wire_nbytes(n, (b, s, q_out))  # block 2: q+v, block 3: q
    up = cut + sites + 2 * wire_nbytes(n, (b, s, hidden))  # + the two site-input gradients
    assert traffic.payload_bytes_sent == up
    assert traffic.payload_bytes_received == up  # sums of the same shapes in the other direction
    assert traffic.round_trips == 2 + 2 * 2


@pytest.fixture(scope="module")
def dlora_run(tiny_cloud, pki, tmp_path_factory):
    """``edgetune-edge train --mode dlora`` with Kill-and-Revive and int8, as a real process."""
    tmp_path = tmp_path_factory.mktemp("dlora")
    write_toy_sentiment(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "train", "--cloud", tiny_cloud.address, "--identity",
         str(identity(pki, "alice")), "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
         "--mode", "dlora", "--kr-budget", "0.5", "--kr-warmup", "1", "--kr-probe-every", "3", "--wire-dtype", "int8",
         "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "0",
         "--out", str(run), "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "EDGETUNE_CACHE": str(tmp_path_factory.getbasetemp() / "cache-dlora")})
    assert proc.returncode == 0, proc.stderr
    return run


def test_dlora_cli_run_accounts_per_step_and_module(dlora_run):
    metrics = json.loads((dlora_run / "metrics.json").read_text())
    assert metrics["mode"] == "dlora" and metrics["steps"] == 4 and metrics["settings"]["wire_dtype"] == "int8"
    steps = metrics["per_step"]
    assert [s["probe"] for s in steps] == [True, False, False, True]
    assert [s["active_modules"] for s in steps] == [12, 6, 6, 12]  # 8 edge-held + 4 cloud-held, budget 0.5
    assert steps[0]["site_exchanges"] == 4 and steps[3]["site_exchanges"] == 4  # probes: 2 blocks x 2 directions
    assert all(s["round_trips"] == 2 + s["site_exchanges"] for s in steps)
    assert metrics["site_exchanges"] == sum(s["site_exchanges"] for s in steps)
    assert metrics["lora_flops"] == sum(s["lora_flops"] for s in steps) > 0
    modules = {m["module"]: m for m in metrics["per_module"]}
    assert len(modules) == 12 and {m["placement"] for m in modules.values()} == {"edge", "cloud"}
    cloud = [m for m in modules.values() if m["placement"] == "cloud"]
    cut_payload = sum(2 * s["tokens"] * (32 + 4) for s in steps)  # int8: one byte a value, 4 per token scale
    site_bytes = metrics["bytes_sent"] - cut_payload
    assert sum(m["bytes_sent"] for m in cloud) == pytest.approx(site_bytes, rel=0.02)
    assert sum(m["steps_active"] for m in modules.values()) == sum(s["active_modules"] for s in steps)
    assert metrics["kr_events"] and all(e["kind"] in ("kill", "revive") for e in metrics["kr_events"])
    assert (dlora_run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["eval_accuracy_after"] is not None and metrics["eval_bytes_sent"] > 0


def test_dlora_adapter_loads_in_peft_with_the_logits_of_dlora_inference(dlora_run, tiny_cloud, pki, tiny_dirs):
    adapter = dlora_run / "adapter"
    state, config = load_adapter_state(adapter)
    assert any("layers.2.self_attn.q_proj" in t for t in config["target_modules"])  # cloud-held sites inside
    assert any("layers.0.self_attn.q_proj" in t for t in config["target_modules"])
    ids = torch.randint(1, 96, (2, 10))
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        info = client.open_session("dlora", 2)
        model, bank = dlora_edge(client, info, LoraSettings(config["r"], config["lora_alpha"]))
        load_dlora_adapter(model, bank, state, arch_for(load_causal_lm(tiny_dirs["llama"]).config))
        stream = client.train_stream(info)
        dlora_out = split_logits(model, DloraMiddle(stream, SiteServer(bank)), ids, Traffic())
        stream.close()
    full = PeftModel.from_pretrained(load_causal_lm(tiny_dirs["llama"]), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, dlora_out, rtol=1e-5, atol=1e-5)


def test_bad_dlora_requests_get_clear_status(tiny_cloud, pki):
    with secure_channel(tiny_cloud.address, identity(pki, "alice")) as channel:
        client = CloudClient(channel)
        with pytest.raises(CloudCallError, match=r"INVALID_ARGUMENT.*not projections of llama"):
            client.open_session("dlora", 2, ("qkv",))
        info = client.open_session("dlora", 2)
        stream = client.train_stream(info)
        with pytest.raises(CloudCallError, match=r"INVALID_ARGUMENT.*active sites \[7\]"):
            stream.send(1, Phase.FORWARD_TRAIN, torch.zeros(1, 4, 32), Traffic(), active_sites=(7,))
            stream.receive(1, Traffic())
