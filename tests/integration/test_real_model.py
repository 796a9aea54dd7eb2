"""One short end-to-end run on the real default model, SmolLM2-135M, over real mutual TLS."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from edge.modes.split import RemoteMiddle, split_logits
from edge.rpc.client import CloudClient
from emulator.adapters.lora import with_adapter
from emulator.model.bundle import load_edge_model
from emulator.model.loading import load_causal_lm, resolve_model
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from tests.conftest import REPO, start_cloud, stop_cloud

pytestmark = [pytest.mark.integration, pytest.mark.real_model]
# Split inference over the wire vs the full model, both fp32, logits of magnitude ~30: measured 6.2e-3 apart
# without any adapter (max abs), 7.4e-3 with one. The trained adapter moves the logits by ~10 (measured 9.9),
# so a module placed on the wrong projection or block is far outside this bound.
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def smol_cloud(pki, tmp_path_factory):
    cloud = start_cloud("smollm2-135m", pki, tmp_path_factory.mktemp("smol-store"))
    yield cloud
    stop_cloud(cloud)


def test_real_model_split_run(smol_cloud, pki, tmp_path):
    rows = [("a gripping, beautifully acted film", " positive"), ("dull and far too long", " negative")] * 4
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Review: {t}\nSentiment:", "completion": c}) + "\n" for t, c in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(
        {"prompt": f"Review: {t}\nSentiment:", "choices": [" negative", " positive"], "answer": int(c == " positive")})
        + "\n" for t, c in rows[:4]))
    identity = pki / "clients" / "alice"
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "edge.cli", "train", "--cloud", smol_cloud.address, "--identity", str(identity),
         "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"), "--steps", "4",
         "--batch-size", "2", "--seq-len", "32", "--out", str(run), "--threads", "1",
         # A learning rate that moves LoRA B well away from zero: the adapter must change the logits by far
         # more than the tolerance below, or a misplaced module would pass unnoticed.
         "--lr", "5e-3", "--warmup-steps", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["edge_flops"] > 0
    for step in metrics["per_step"]:  # two cuts, each (batch, seq, 576) fp32, up and down
        assert step["payload_bytes_sent"] == step["payload_bytes_received"] == 2 * step["tokens"] * 576 * 4
    assert metrics["setup_payload_bytes_received"] > 50e6  # embedding + 4 blocks, streamed in chunks

    with secure_channel(smol_cloud.address, identity) as channel:
        client = CloudClient(channel)
        pulled = tmp_path / "pulled"
        client.pull_adapter(metrics["adapter_id"], pulled)
        info = client.open_session("split")
        edge = load_edge_model(client.bundle(info))
        assert client.setup.bytes_received == 0  # cached by content hash: nothing downloaded again
        model = with_adapter(edge, pulled, edge.bottom.spec)
        stream = client.train_stream(info)
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) + 1000
        split_out = split_logits(model, RemoteMiddle(stream), ids, Traffic())
        stream.close()
    full = PeftModel.from_pretrained(load_causal_lm(resolve_model("smollm2-135m")), str(pulled)).eval()
    with torch.no_grad():
        adapted = full(ids).logits
        with full.disable_adapter():
            base = full(ids).logits
    effect = float((adapted - base).abs().max())
    # The reference: PEFT's own placement of every module on the full model. Both sides are fp32.
    torch.testing.assert_close(adapted, split_out, rtol=0, atol=TOLERANCE)
    assert effect > 50 * TOLERANCE, f"the trained adapter moves the logits by only {effect:.2e}"
