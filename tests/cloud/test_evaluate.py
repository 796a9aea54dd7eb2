"""``edgetune-cloud evaluate``: the owner's score of a registered adapter, against a PEFT reference."""

import json
import random

import pytest
import torch
from peft import PeftModel

from cloud.cli import main as cloud_main
from cloud.owner.evaluate import EvaluateConfig, EvaluateError, evaluate_recipe
from cloud.store.registry import AdapterRegistry
from emulator.adapters.lora import (
    LoraSettings,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    peft_config,
    save_adapter,
)
from emulator.model.arch import arch_for
from emulator.model.loading import load_causal_lm
from emulator.model.segments import split_causal_lm
from protocol.types import AdapterMeta
from tests.tiny_models import tiny_tokenizer


@pytest.fixture
def registered(tiny_dirs, tmp_path):
    """A LoRA adapter with large random weights (so it changes predictions), registered for alice."""
    model = load_causal_lm(tiny_dirs["llama"])
    spec = arch_for(model.config)
    settings = LoraSettings(rank=4, alpha=8, targets=("all",))
    edge = add_lora(split_causal_lm(model, 2).edge, settings, spec)
    torch.manual_seed(5)
    for p in lora_parameters(edge).values():
        torch.nn.init.normal_(p, std=0.3)
    staged = tmp_path / "staged"
    save_adapter(staged, adapter_state_dict(edge, spec), peft_config(edge, settings, spec, "tiny"))
    registry = AdapterRegistry(tmp_path / "store")
    meta = registry.add("alice", AdapterMeta(mode="split", base_model="tiny"), staged)
    registry.close()
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 20))),
             "choices": [" no", " yes"] if i % 2 else [" x", " y", " z"], "answer": rng.randrange(2)}
            for i in range(24)]  # multi-token and single-token choices, mixed lengths
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "store", meta.adapter_id, data, rows, staged


def reference_predictions(model, rows) -> list[int]:
    """Row by row, no padding: the choice with the highest summed log-likelihood, from full logits."""
    tok, predictions = tiny_tokenizer(), []
    for row in rows:
        prompt = tok(row["prompt"]).input_ids
        scores = []
        for choice in row["choices"]:
            ids = tok(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            scores.append(sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


def test_evaluate_matches_peft_reference_for_adapter_and_base(tiny_dirs, registered):
    store, adapter_id, data, rows, staged = registered
    base = load_causal_lm(tiny_dirs["llama"])
    rows = [{**r, "answer": p} for r, p in zip(rows, reference_predictions(base, rows))]  # base scores 1.0
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    peft = PeftModel.from_pretrained(load_causal_lm(tiny_dirs["llama"]), str(staged)).eval()
    tuned = reference_predictions(peft, rows)
    expected = sum(p == r["answer"] for p, r in zip(tuned, rows)) / len(rows)
    assert expected < 1  # the adapter changes some predictions, so a missed plug-in would show
    result = evaluate_recipe(EvaluateConfig(str(tiny_dirs["llama"]), store, adapter_id, data, baseline=True, batch=5))
    assert result.owner == "alice" and result.rows == len(rows)
    assert result.accuracy == pytest.approx(expected)
    assert result.base_accuracy == 1.0


def test_evaluate_cli_reports_and_refuses_clearly(tiny_dirs, registered, tmp_path, capsys):
    store, adapter_id, data, _, _ = registered
    assert cloud_main(["evaluate", "--model", str(tiny_dirs["llama"]), "--store", str(store),
                       "--adapter", adapter_id, "--data", str(data)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["accuracy"] == pytest.approx(float(out[0].split("accuracy ")[1].split()[0]), abs=1e-4)
    assert cloud_main(["evaluate", "--model", str(tiny_dirs["llama"]), "--store", str(store),
                       "--adapter", adapter_id, "--data", str(data), "--owner", "bob"]) == 2
    assert "no adapter" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n')
    assert cloud_main(["evaluate", "--model", str(tiny_dirs["llama"]), "--store", str(store),
                       "--adapter", adapter_id, "--data", str(bad)]) == 2
    assert f"{bad}:1: field 'choices' must be a list of at least 2 strings" in capsys.readouterr().err
    with pytest.raises(EvaluateError, match="no adapter registry"):
        evaluate_recipe(EvaluateConfig("tiny", tmp_path / "nowhere", adapter_id, data))
