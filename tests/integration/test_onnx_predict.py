"""predict / eval --runtime onnx against a real coordinator process, with torch, transformers and peft
blocked from import: the same predictions as torch split inference with the adapter applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from edge.modes.split import score_examples, split_logits
from edge.rpc.client import CloudClient
from edge.runtime.manifest import MANIFEST
from edge.training.recipes import open_edge_session
from emulator.adapters.lora import with_adapter
from emulator.data.datasets import load_eval
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from tests.conftest import REPO
from tests.edge.runtime_fixtures import trained_adapter
from tests.tiny_models import write_toy_sentiment

pytestmark = pytest.mark.integration

BLOCK_TORCH = """
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'safetensors', 'accelerate'):
            raise ImportError(f'{name} is blocked in this test (torch-free install)')
sys.meta_path.insert(0, Blocked())
sys.argv = ['edgetune-edge', *sys.argv[1:]]
runpy.run_module('edge.cli', run_name='__main__')
"""


def edge_cli_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def exported(tiny_cloud, pki, tmp_path_factory):
    """An adapter trained (random non-zero LoRA) on the cloud's model, exported from the cached bundle,
    and torch's split-inference predictions for the toy eval set with it."""
    root = tmp_path_factory.mktemp("onnx-predict")
    _, eval_file = write_toy_sentiment(root / "data", eval_rows=10)
    with secure_channel(tiny_cloud.address, pki / "clients" / "alice") as channel:
        es = open_edge_session(CloudClient(channel), 0, "float32")
        trained_adapter(es.model, root / "run" / "adapter", es.model_name, seed=4, std=0.3)
        model = with_adapter(es.model, root / "run" / "adapter", es.model.bottom.spec).eval()
        examples = load_eval(eval_file, es.tokenizer, 64).examples
        want = score_examples(model, es.link, examples, es.pad_id, Traffic())
        ids = torch.tensor([es.tokenizer("Review: good").input_ids])
        for _ in range(4):  # greedy completion, one split pass per token
            ids = torch.cat([ids, split_logits(model, es.link, ids, Traffic())[:, -1:].argmax(-1)], dim=1)
        completion = es.tokenizer.decode(ids[0, -4:].tolist(), skip_special_tokens=True)
        es.link.stream.close()
    out = subprocess.run([sys.executable, "-m", "edge.cli", "export", "--adapter", str(root / "run" / "adapter"),
                          "--out", str(root / "export")], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return root, eval_file, want, completion


def test_predict_without_torch_matches_torch(exported, tiny_cloud, pki):
    root, eval_file, want, completion = exported
    data = root / "predict.jsonl"
    data.write_text(eval_file.read_text() + json.dumps({"prompt": "Review: good"}) + "\n")
    result = edge_cli_without_torch("predict", "--runtime", "onnx", "--cloud", tiny_cloud.address, "--identity",
                                    str(pki / "clients" / "alice"), "--model", str(root / "export"), "--data",
                                    str(data), "--out", str(root / "out.jsonl"), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows[:-1]] == want
    assert [r["label"] for r in rows[:-1]] == [[" negative", " positive"][p] for p in want]
    assert rows[-1] == {"index": len(want), "completion": completion}


def test_eval_runtime_onnx_without_torch_matches_torch(exported, tiny_cloud, pki):
    root, eval_file, want, _ = exported
    answers = [json.loads(line)["answer"] for line in eval_file.read_text().splitlines()]
    result = edge_cli_without_torch("eval", "--runtime", "onnx", "--cloud", tiny_cloud.address, "--identity",
                                    str(pki / "clients" / "alice"), "--model", str(root / "export"),
                                    "--data", str(eval_file))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["eval_accuracy"] == pytest.approx(sum(p == a for p, a in zip(want, answers)) / len(want))
    assert report["eval_runtime"] == "onnx" and report["eval_bytes_sent"] > 0


def test_a_different_base_model_is_refused(exported, tiny_cloud, pki, tmp_path):
    root, eval_file, _, _ = exported
    export = tmp_path / "export"
    subprocess.run(["cp", "-r", str(root / "export"), str(export)], check=True)
    manifest = json.loads((export / MANIFEST).read_text())
    manifest["base_model"]["name"] = "smollm2-135m"
    (export / MANIFEST).write_text(json.dumps(manifest))
    result = edge_cli_without_torch("predict", "--cloud", tiny_cloud.address, "--identity",
                                    str(pki / "clients" / "alice"), "--model", str(export), "--data",
                                    str(eval_file), "--out", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "made for base model 'smollm2-135m'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
