import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from emulator.adapters.lora import (
    AdapterMismatchError,
    LoraSettings,
    adapter_state_dict,
    add_lora,
    load_adapter_state,
    load_into_segments,
    lora_parameters,
    peft_config,
    save_adapter,
)
from emulator.model.arch import arch_for
from emulator.model.segments import split_causal_lm
from tests.conftest import FAMILIES
from tests.tiny_models import tiny_model


def _randomized(model):
    torch.manual_seed(1)
    for p in lora_parameters(model).values():
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_loads_on_full_model_with_same_logits(family, tmp_path):
    model = tiny_model(family)
    spec = arch_for(model.config)
    split = split_causal_lm(model, 2)
    settings = LoraSettings(rank=4, alpha=8)
    edge = _randomized(add_lora(split.edge, settings, spec))
    save_adapter(tmp_path, adapter_state_dict(edge, spec), peft_config(edge, settings, spec, "tiny"))
    ids = torch.randint(1, 96, (2, 9))
    with torch.no_grad():
        base = model(ids).logits.clone()
        split_out = edge.top(split.middle(edge.bottom(ids)))
        peft_out = PeftModel.from_pretrained(model, str(tmp_path)).eval()(ids).logits
    torch.testing.assert_close(peft_out, split_out, rtol=0, atol=1e-5)
    assert (peft_out - base).abs().max() > 1e-3  # the adapter really changes the model


def test_saved_keys_use_peft_full_model_names(tmp_path):
    model = tiny_model("llama")
    spec = arch_for(model.config)
    edge = add_lora(split_causal_lm(model, 2).edge, LoraSettings(), spec)
    save_adapter(tmp_path, adapter_state_dict(edge, spec), peft_config(edge, LoraSettings(), spec, "tiny"))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.5.self_attn.v_proj.lora_B.weight" in keys
    assert len(keys) == 4 * 2 * 2  # 4 edge blocks x (q, v) x (A, B)
    _, config = load_adapter_state(tmp_path)
    assert "model.layers.2.self_attn.q_proj" not in config["target_modules"]


def test_all_linear_targets_and_only_lora_trainable():
    model = tiny_model("llama")
    spec = arch_for(model.config)
    edge = add_lora(split_causal_lm(model, 1).edge, LoraSettings(targets=("all",)), spec)
    trainable = [n for n, p in edge.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2


def test_loading_mismatched_adapter_is_refused(tmp_path):
    model = tiny_model("llama")
    spec = arch_for(model.config)
    edge2 = add_lora(split_causal_lm(model, 2).edge, LoraSettings(), spec)
    edge1 = add_lora(split_causal_lm(model, 1).edge, LoraSettings(), spec)
    with pytest.raises(AdapterMismatchError):
        load_into_segments(edge1, adapter_state_dict(edge2, spec), spec)
