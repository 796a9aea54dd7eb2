"""Offsite-Tuning end to end over real mutual TLS against a coordinator running as its own process."""

import json
import subprocess
import sys
from contextlib import contextmanager

import grpc
import pytest
import torch
from peft import PeftModel

from cloud.owner.federated import fedavg
from edge.modes.offsite import train_offsite
from edge.modes.split import LocalMiddle, score_examples
from edge.rpc.client import CloudCallError, CloudClient
from edge.training.recipes import TrainConfig
from emulator.adapters.lora import LoraSettings, load_adapter_state
from emulator.adapters.plugin import adapter_state, apply_to_edge, plug_in
from emulator.data.datasets import load_eval
from emulator.model.arch import arch_for
from emulator.model.loading import load_causal_lm
from emulator.model.segments import split_causal_lm
from protocol.accounting import GRPC_FRAME_BYTES, Traffic
from protocol.channel import secure_channel
from protocol.pki import issue_client
from tests.conftest import REPO, start_cloud, stop_cloud
from tests.tiny_models import tiny_tokenizer

pytestmark = pytest.mark.integration
K, E = 1, 2  # tiny 6-block model: adapter blocks 0 and 5, emulator of 2 of the 4 middle blocks


def write_data(directory, n_train, salt=0):
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Review: {'good' if i % 2 else 'bad'} {i + salt}\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(n_train)]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"prompt": f"Review: {'good' if i % 2 else 'bad'} film\nSentiment:", "choices": [" negative", " positive"],
              "answer": i % 2} for i in range(8)]
    (directory / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return directory


@pytest.fixture(scope="module")
def offsite_cloud(tiny_dirs, pki, tmp_path_factory):
    cloud = start_cloud(str(tiny_dirs["llama"]), pki, tmp_path_factory.mktemp("offsite-store"),
                        ["--edge-layers", str(K), "--emulator-layers", str(E), "--rounds", "2",
                         "--clients-per-round", "2", "--local-steps", "2", "--round-deadline", "60",
                         "--fed-lora-rank", "4"])
    yield cloud
    stop_cloud(cloud)


class ChannelLog:
    """Wraps every channel the recipe opens and counts each message's bytes, the way Traffic does."""

    def __init__(self):
        self.channels = []  # per channel: {"rpcs": [...], "bytes": int, "open": bool}

    @contextmanager
    def connect(self, target, identity):
        record = {"rpcs": [], "bytes": 0, "open": True}
        assert not any(c["open"] for c in self.channels), "two channels open at once"
        self.channels.append(record)
        with secure_channel(target, identity) as channel:
            yield grpc.intercept_channel(channel, _Counter(record))
        record["open"] = False


class _Counter(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
               grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, record):
        self.record = record

    def _count(self, message):
        self.record["bytes"] += message.ByteSize() + GRPC_FRAME_BYTES
        return message

    def _requests(self, iterator):
        for message in iterator:
            yield self._count(message)

    def _responses(self, iterator):
        for message in iterator:
            yield self._count(message)

    def intercept_unary_unary(self, continuation, details, request):
        self.record["rpcs"].append(details.method.rsplit("/", 1)[-1])
        self._count(request)
        call = continuation(details, request)
        self._count(call.result())
        return call

    def intercept_unary_stream(self, continuation, details, request):
        self.record["rpcs"].append(details.method.rsplit("/", 1)[-1])
        self._count(request)
        return self._responses(continuation(details, request))

    def intercept_stream_unary(self, continuation, details, requests):
        self.record["rpcs"].append(details.method.rsplit("/", 1)[-1])
        call = continuation(details, self._requests(requests))
        self._count(call.result())
        return call

    def intercept_stream_stream(self, continuation, details, requests):
        self.record["rpcs"].append(details.method.rsplit("/", 1)[-1])
        return self._responses(continuation(details, self._requests(requests)))


@pytest.mark.parametrize("tune", ["lora", "lora-top", "full"])
def test_offline_training_sends_nothing_between_download_and_upload(offsite_cloud, pki, tiny_dirs, tmp_path, tune,
                                                                    monkeypatch):
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))  # a device that has not downloaded it yet
    data = write_data(tmp_path / "data", 16)
    cfg = TrainConfig(cloud=offsite_cloud.address, identity=pki / "clients" / "alice", data=data / "train.jsonl",
                      eval=data / "eval.jsonl", out=tmp_path / "run", mode="offsite", tune=tune, steps=3,
                      batch_size=4, seq_len=32, lr=1e-3, warmup_steps=0, lora=LoraSettings(4, 8), seed=1,
                      eval_before=tune != "full")  # --no-eval-before once (the demo reuses a measured zero-shot)
    log = ChannelLog()
    metrics = train_offsite(cfg, log.connect).as_dict()
    download, upload = log.channels
    assert download["rpcs"] == ["OpenSession", "FetchBundle"]
    assert upload["rpcs"] == ["RegisterAdapter"]
    # Training and the emulator evaluations ran with no channel open, and the recipe's own counters agree
    # with the channel's: everything that crossed the wire is the download and the upload.
    assert download["bytes"] == metrics["setup_bytes_sent"] + metrics["setup_bytes_received"]
    assert upload["bytes"] == metrics["upload_bytes_sent"] + metrics["upload_bytes_received"]
    assert metrics["bytes_sent"] == metrics["bytes_received"] == metrics["round_trips"] == 0
    assert all(s["bytes_sent"] == s["bytes_received"] == 0 for s in metrics["per_step"])
    assert metrics["site_exchanges"] == 0  # no cut crossings to subtract (was -2 per step)
    assert metrics["setup_payload_bytes_received"] > 0 and metrics["upload_payload_bytes_sent"] > 0
    assert metrics["edge_flops"] > 0 and metrics["tokens_per_s"] > 0 and metrics["edge_peak_rss_mb"] > 0
    # The default emulator: the E most important of the middle blocks 1..4 (cloud.store.emulators.default_spec).
    blocks = metrics["emulator"]["blocks"]
    assert len(blocks) == E and set(blocks) < {1, 2, 3, 4} and metrics["emulator"]["selection"] == "importance"
    assert metrics["mode"] == "offsite"
    assert (metrics["eval_accuracy_before"] is None) == (tune == "full") and metrics["eval_accuracy_after"] is not None
    # The cloud registered what was uploaded, and it plugs into the full model.
    pulled = tmp_path / "pulled"
    with secure_channel(offsite_cloud.address, pki / "clients" / "alice") as channel:
        CloudClient(channel).pull_adapter(metrics["adapter_id"], pulled)
    full = load_causal_lm(tiny_dirs["llama"])
    for name, value in adapter_state(pulled).items():
        torch.testing.assert_close(value, adapter_state(tmp_path / "run" / "adapter")[name])
    ids = torch.randint(1, 96, (2, 7))
    with torch.no_grad():
        merged = plug_in(full, pulled)(ids).logits
        base = full(ids).logits
    assert not torch.allclose(merged, base)
    if tune == "lora-top":  # the usual LoRA format; the bottom blocks' B stayed zero, the top blocks' moved
        by_layer: dict[int, list[torch.Tensor]] = {}
        for name, value in adapter_state(pulled).items():
            if ".lora_B." in name:
                by_layer.setdefault(int(name.split(".layers.")[1].split(".")[0]), []).append(value)
        moved = {layer: any(bool(v.abs().sum() > 0) for v in values) for layer, values in by_layer.items()}
        layers = sorted(moved)
        k = len(layers) // 2
        assert [moved[i] for i in layers] == [False] * k + [True] * k, moved


def run_edge(args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "edge.cli", *args, "--threads", "1"] if args[0] == "train" else
                          [sys.executable, "-m", "edge.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_offsite_cli_train_then_eval_reports_emulator_and_plug_in(offsite_cloud, pki, tiny_dirs, tmp_path):
    data = write_data(tmp_path / "data", 16)
    who = ["--cloud", offsite_cloud.address, "--identity", str(pki / "clients" / "bob")]
    out = run_edge(["train", *who, "--mode", "offsite", "--data", str(data / "train.jsonl"), "--eval",
                    str(data / "eval.jsonl"), "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
                    "--warmup-steps", "0", "--lora-rank", "4", "--out", str(tmp_path / "run")])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["adapter_id"] in out and metrics["bytes_sent"] == 0
    report = json.loads(run_edge(["eval", *who, "--mode", "offsite", "--data", str(data / "eval.jsonl"),
                                  "--adapter", str(tmp_path / "run" / "adapter"), "--seq-len", "32"]))
    assert report["eval_emulator_zero_shot"] == metrics["eval_accuracy_before"]
    assert report["eval_emulator_adapter"] == metrics["eval_accuracy_after"]
    assert report["eval_bytes_sent"] > 0  # the plug-in ran on the cloud's full middle
    # Reference: the full model with the adapter, in-process.
    full = load_causal_lm(tiny_dirs["llama"])
    split = split_causal_lm(full, K)
    tuned = apply_to_edge(split.edge, tmp_path / "run" / "adapter", arch_for(full.config))
    examples = load_eval(data / "eval.jsonl", tiny_tokenizer(), 32).examples
    predictions = score_examples(tuned, LocalMiddle(split.middle), examples, 0, Traffic())
    expected = sum(p == ex.answer for p, ex in zip(predictions, examples)) / len(examples)
    assert report["eval_plug_in"] == pytest.approx(expected)
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_dirs["llama"]), str(tmp_path / "run" / "adapter"))
    assert {n for n, _ in peft.named_parameters() if "lora_A" in n}  # loads as a plain PEFT adapter


def test_two_clients_run_fedavg_rounds_and_both_pull_the_final_adapter(offsite_cloud, pki, tmp_path):
    procs, runs = [], {}
    for name, rows in (("alice", 16), ("bob", 8)):
        data = write_data(tmp_path / name, rows, salt=100 if name == "bob" else 0)
        runs[name] = tmp_path / f"run-{name}"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "train", "--cloud", offsite_cloud.address, "--identity",
             str(pki / "clients" / name), "--mode", "offsite", "--federated", "--data", str(data / "train.jsonl"),
             "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "0", "--out",
             str(runs[name]), "--threads", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
    metrics = {n: json.loads((r / "metrics.json").read_text()) for n, r in runs.items()}
    assert metrics["alice"]["adapter_id"] == metrics["bob"]["adapter_id"]
    assert [r["round"] for r in metrics["alice"]["rounds"]] == [1, 2] == [r["round"] for r in metrics["bob"]["rounds"]]
    assert metrics["alice"]["steps"] == 4 and metrics["alice"]["bytes_sent"] == 0  # 2 rounds x 2 local steps
    final = load_adapter_state(runs["alice"] / "adapter")[0]
    updates = [(n, load_adapter_state(runs[name] / "rounds" / "round-2-update")[0])
               for name, n in (("alice", 16), ("bob", 8))]
    for key, value in fedavg(updates).items():
        torch.testing.assert_close(final[key], value)
    assert (runs["bob"] / "adapter" / "adapter_model.safetensors").read_bytes() == (
        runs["alice"] / "adapter" / "adapter_model.safetensors").read_bytes()
    # A third identity that took no part sees neither the global adapter nor anyone's updates.
    outsider = pki / "clients" / "fed-outsider"
    if not outsider.exists():
        issue_client(pki, "fed-outsider")
    with secure_channel(offsite_cloud.address, outsider) as channel:
        client = CloudClient(channel)
        assert client.list_adapters() == []
        with pytest.raises(CloudCallError, match="NOT_FOUND"):
            client.pull_adapter(metrics["alice"]["adapter_id"], tmp_path / "stolen")
