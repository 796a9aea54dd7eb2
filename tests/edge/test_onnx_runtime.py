"""Exported LoRA-merged edge segments on onnxruntime match the torch segments with the adapter applied."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge.cli import main
from edge.runtime.export import export, merged_edge
from edge.runtime.inputs import load_rows
from edge.runtime.manifest import MANIFEST, ExportError, check_base_model, read_manifest
from edge.runtime.onnx_runner import OnnxEdge, choose
from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, peft_config, save_adapter
from emulator.data.datasets import load_eval
from emulator.data.scoring import predict
from emulator.model.bundle import load_edge_model, read_plan
from emulator.model.loading import load_tokenizer
from tests.conftest import FAMILIES
from tests.edge.runtime_fixtures import bundle_and_adapter, tiny_bundle
from tests.tiny_models import VOCAB, write_toy_sentiment


@pytest.fixture(scope="module")
def exports(tiny_dirs, tmp_path_factory) -> dict:
    """Per family: (export dir, torch LoRA model, bundle)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"onnx-{family}")
        bundle, adapter, model = bundle_and_adapter(tiny_dirs[family], root, f"tiny-{family}")
        export(adapter, root / "export", bundle=bundle)
        out[family] = (root / "export", model, bundle, adapter)
    return out


def _all_positions(batch: int, seq: int) -> np.ndarray:
    return np.array([(i, j) for i in range(batch) for j in range(seq)], dtype=np.int64)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_match_torch_with_trained_lora(exports, family):
    directory, model, bundle, _ = exports[family]
    edge = OnnxEdge(directory, threads=1)
    ids = torch.randint(1, VOCAB, (3, 13), generator=torch.Generator().manual_seed(7))  # not the export shape
    with torch.no_grad():
        hidden = model.bottom(ids)
        logits = model.top(hidden)
        base_logits = load_edge_model(bundle).top(hidden)
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changes the output: it is merged, not lost
    ort_hidden = edge.bottom(ids.numpy())
    np.testing.assert_allclose(ort_hidden, hidden.numpy(), atol=1e-4, rtol=0)
    ort_logits = edge.logits_at(hidden.numpy(), _all_positions(3, 13))
    np.testing.assert_allclose(ort_logits, logits.reshape(-1, VOCAB).numpy(), atol=1e-4, rtol=0)


def test_manifest_records_hashes_shapes_and_adapter(exports):
    directory, _, bundle, adapter = exports["llama"]
    manifest = read_manifest(directory)
    assert set(manifest["files"]) == {"bottom.onnx", "top.onnx", "tokenizer.json"}
    assert manifest["base_model"]["name"] == "tiny-llama"
    assert manifest["base_model"]["edge_layers"] == read_plan(bundle)[0].edge_layers
    assert manifest["adapter"]["scope"] == "complete" and manifest["adapter"]["format"] == "lora"
    assert manifest["graphs"]["top"]["outputs"]["logits"] == ["float32", "n", VOCAB]
    assert manifest["opset"] >= 17


def test_scoring_matches_torch_scoring(exports, tmp_path):
    directory, model, _, _ = exports["gpt2"]
    from tokenizers import Tokenizer

    _, eval_file = write_toy_sentiment(tmp_path, eval_rows=8)
    with eval_file.open("a") as f:  # multi-token choices take one sequence per choice
        f.write(json.dumps({"prompt": "Review: ok", "choices": [" so so", " great!"], "answer": 1}) + "\n")
    rows = load_rows(eval_file, Tokenizer.from_file(str(directory / "tokenizer.json")), 64)
    examples = load_eval(eval_file, load_tokenizer(exports["gpt2"][2]), 64).examples
    assert [(r.sequences, r.targets) for r in rows] == [(e.sequences, e.targets) for e in examples]

    def middle(hidden):
        return hidden  # identity middle: the test is about the two ends

    got = [c for c, _ in choose(OnnxEdge(directory, 1), middle, rows, 0)]
    want = predict(examples, lambda ids: model.top.features(model.bottom(ids)), model.top.lm_head, 0)
    assert got == want


def test_int8_export_is_close_to_fp32(exports, tmp_path):
    _, _, bundle, adapter = exports["llama"]
    result = export(adapter, tmp_path / "int8", quantize="int8", bundle=bundle)
    assert result.manifest["precision"] == "int8"
    fp32, int8 = OnnxEdge(exports["llama"][0], 1), OnnxEdge(tmp_path / "int8", 1)
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 9))
    a, b = fp32.bottom(ids), int8.bottom(ids)
    relative = np.sqrt(((a - b) ** 2).mean() / (a ** 2).mean())
    assert 0 < relative < 0.1, relative  # quantized (not identical), and still close (relative RMS error)


def test_dlora_export_merges_edge_blocks_and_names_the_rest(tiny_dirs, tmp_path):
    bundle = tiny_bundle(tiny_dirs["llama"], tmp_path / "bundles", "tiny-llama")
    edge = load_edge_model(bundle)
    spec, settings = edge.bottom.spec, LoraSettings(4, 8, 0.0, ("q_proj", "v_proj"))
    torch.manual_seed(3)
    model = add_lora(edge, settings, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    state = adapter_state_dict(model, spec)
    cloud = {k.replace(".layers.0.", ".layers.2."): v.clone() for k, v in state.items() if ".layers.0." in k}
    save_adapter(tmp_path / "adapter", {**state, **cloud}, peft_config(model, settings, spec, "tiny-llama",
                 extra_targets=["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]))
    result = export(tmp_path / "adapter", tmp_path / "out", bundle=bundle)
    assert result.manifest["adapter"]["scope"] == "edge-blocks-only"
    assert result.manifest["adapter"]["dropped_modules"] == ["model.layers.2.self_attn.q_proj",
                                                             "model.layers.2.self_attn.v_proj"]
    assert "not part of this export" in result.note
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        want = model.eval().bottom(ids).numpy()
    np.testing.assert_allclose(OnnxEdge(tmp_path / "out", 1).bottom(ids.numpy()), want, atol=1e-4, rtol=0)


def test_merged_edge_equals_lora_forward(exports):
    _, model, bundle, adapter = exports["opt"]
    merged, dropped = merged_edge(load_edge_model(bundle), adapter, read_plan(bundle)[0])
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(merged.top(merged.bottom(ids)), model.top(model.bottom(ids)), atol=1e-5, rtol=0)
    assert dropped == [] and not any("lora_" in n for n, _ in merged.named_parameters())


def _copy_export(exports, tmp_path):
    directory = tmp_path / "export"
    shutil.copytree(exports["llama"][0], directory)
    return directory


def _predict(directory, tmp_path, capsys) -> tuple[int, str]:
    _, eval_file = write_toy_sentiment(tmp_path / "data")
    code = main(["predict", "--runtime", "onnx", "--cloud", "127.0.0.1:1", "--identity", str(tmp_path),
                 "--model", str(directory), "--data", str(eval_file), "--out", str(tmp_path / "p.jsonl")])
    return code, capsys.readouterr().err.strip()


def test_predict_refuses_a_damaged_export(exports, tmp_path, capsys):
    directory = _copy_export(exports, tmp_path)
    with (directory / "top.onnx").open("ab") as f:
        f.write(b"\0")
    code, err = _predict(directory, tmp_path, capsys)
    assert code == 2 and "top.onnx: SHA-256 does not match" in err and "\n" not in err


def test_predict_refuses_a_missing_file_or_manifest(exports, tmp_path, capsys):
    directory = _copy_export(exports, tmp_path)
    (directory / "tokenizer.json").unlink()
    code, err = _predict(directory, tmp_path, capsys)
    assert code == 2 and "tokenizer.json: missing from the export" in err
    (directory / MANIFEST).unlink()
    code, err = _predict(directory, tmp_path, capsys)
    assert code == 2 and "manifest.json: missing" in err
    code, err = _predict(tmp_path / "nowhere", tmp_path, capsys)
    assert code == 2 and "no such directory" in err


def test_a_different_base_model_is_refused(exports):
    manifest = read_manifest(exports["llama"][0])
    base = manifest["base_model"]
    check_base_model(manifest, base["name"], base["model_type"], base["num_blocks"], base["hidden_size"], "c:1")
    with pytest.raises(ExportError, match="made for base model 'tiny-llama'.*serves 'smollm2-135m'"):
        check_base_model(manifest, "smollm2-135m", "llama", 30, 576, "c:1")


def test_export_refuses_bad_input(exports, tmp_path, capsys):
    _, _, bundle, adapter = exports["llama"]
    cases = [
        (["--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "a")], "neither a PEFT LoRA adapter"),
        (["--adapter", str(adapter), "--out", str(exports["llama"][0])], "exists and is not empty"),
        (["--adapter", str(adapter), "--out", str(tmp_path / "b"), "--bundle", str(tmp_path)], "no split.json"),
        (["--adapter", str(adapter), "--out", str(tmp_path / "c")], "no cached edge bundle"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)


def test_runtime_flags_are_checked_before_connecting(tmp_path, capsys):
    _, eval_file = write_toy_sentiment(tmp_path)
    base = ["--cloud", "127.0.0.1:1", "--identity", str(tmp_path), "--data", str(eval_file)]
    existing = tmp_path / "old.jsonl"
    existing.write_text("{}\n")
    cases = [
        (["eval", "--runtime", "onnx", *base], "pass --model DIR"),
        (["eval", "--runtime", "onnx", *base, "--model", str(tmp_path), "--adapter", str(tmp_path)], "not --adapter"),
        (["predict", *base, "--model", str(tmp_path), "--out", str(existing)], "exists; choose a new file"),
        (["predict", *base[:4], "--data", str(tmp_path / "none"), "--model", str(tmp_path), "--out", "x"],
         "file not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    assert existing.read_text() == "{}\n"
