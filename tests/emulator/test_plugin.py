"""Plugging an edge-trained adapter into the full model equals loading the same weights into it."""

import copy

import pytest
import torch
from peft import PeftModel

from edge.modes.split import LocalMiddle, split_logits
from emulator.adapters.lora import (
    LoraSettings,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    peft_config,
    save_adapter,
)
from emulator.adapters.plugin import (
    adapter_format,
    apply_to_edge,
    block_parameters,
    check_fits,
    delta_state_dict,
    export_merged,
    plug_in,
    save_delta,
)
from emulator.model.arch import arch_for, get_submodule
from emulator.model.segments import full_model_name, split_causal_lm
from protocol.accounting import Traffic
from tests.conftest import FAMILIES
from tests.tiny_models import tiny_model

IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))


def trained_lora(family, directory):
    model = tiny_model(family)
    spec = arch_for(model.config)
    settings = LoraSettings(rank=4, alpha=8, targets=("all",))
    split = split_causal_lm(model, 2)
    edge = add_lora(split.edge, settings, spec)
    torch.manual_seed(2)
    for p in lora_parameters(edge).values():
        torch.nn.init.normal_(p, std=0.2)
    save_adapter(directory, adapter_state_dict(edge, spec), peft_config(edge, settings, spec, "tiny"))
    return model, split, edge


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_plug_in_equals_peft_loading_and_split_inference(family, tmp_path):
    model, split, edge = trained_lora(family, tmp_path)
    before = copy.deepcopy(model.state_dict())
    merged = plug_in(model, tmp_path)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(tiny_model(family), str(tmp_path)).eval()(IDS).logits
        merged_logits = merged(IDS).logits
    split_out = split_logits(edge, LocalMiddle(split.middle), IDS, Traffic())
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_logits, split_out, rtol=1e-4, atol=1e-5)
    reapplied = apply_to_edge(split.edge, tmp_path, arch_for(model.config))
    torch.testing.assert_close(split_logits(reapplied, LocalMiddle(split.middle), IDS, Traffic()), split_out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert adapter_format(tmp_path) == "lora"
    check_fits(model, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_plug_in_equals_loading_the_tuned_blocks(family, tmp_path):
    model = tiny_model(family)
    spec = arch_for(model.config)
    split = split_causal_lm(model, 2)
    tuned = copy.deepcopy(split.edge)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in block_parameters(tuned).values():
            p.add_(0.05 * torch.randn_like(p))
    save_delta(tmp_path, delta_state_dict(tuned, split.edge, spec), "tiny")
    assert adapter_format(tmp_path) == "delta"
    check_fits(model, tmp_path)
    reference = tiny_model(family)
    with torch.no_grad():
        params = dict(reference.named_parameters())
        for name, p in block_parameters(tuned).items():
            params[full_model_name(name, spec)].copy_(p)
        expected = reference(IDS).logits
        merged = plug_in(model, tmp_path)(IDS).logits
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    on_edge = apply_to_edge(split.edge, tmp_path, spec)
    torch.testing.assert_close(split_logits(on_edge, LocalMiddle(split.middle), IDS, Traffic()), expected,
                               rtol=1e-5, atol=1e-5)


def test_an_adapter_for_another_model_does_not_fit(tmp_path):
    trained_lora("llama", tmp_path)
    wider = tiny_model("llama")
    layer = get_submodule(wider, "model.layers.0.self_attn")
    layer.q_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match="does not fit"):
        check_fits(wider, tmp_path)


def test_export_writes_a_plain_hf_directory(tiny_dirs, tmp_path):
    from emulator.model.loading import load_causal_lm

    model = load_causal_lm(tiny_dirs["llama"])
    _, split, edge = trained_lora("llama", tmp_path / "adapter")
    out = export_merged(model, tmp_path / "adapter", tiny_dirs["llama"], tmp_path / "merged")
    reloaded = load_causal_lm(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, split_logits(edge, LocalMiddle(split.middle), IDS, Traffic()),
                                   rtol=1e-4, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()
