"""Tiny bundles and trained (random, non-zero) LoRA adapters for the ONNX runtime tests."""

from __future__ import annotations

from pathlib import Path

import torch

from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, peft_config, save_adapter
from emulator.model.bundle import load_edge_model, write_bundle
from emulator.model.loading import load_causal_lm
from emulator.model.segments import EdgeModel, plan_for

SETTINGS = LoraSettings(4, 8, 0.0, ("all",))


def tiny_bundle(model_dir: Path, root: Path, name: str, edge_layers: int = 2) -> Path:
    """The edge bundle of a tiny model directory, as the cloud writes it."""
    model = load_causal_lm(model_dir)
    return write_bundle(model, model_dir, plan_for(model.config, edge_layers), root, name)


def trained_adapter(edge: EdgeModel, out: Path, base_model: str, seed: int = 1, std: float = 0.2) -> EdgeModel:
    """Saves a PEFT adapter with random non-zero A and B (as after training); returns the LoRA model."""
    spec = edge.bottom.spec
    torch.manual_seed(seed)
    model = add_lora(edge, SETTINGS, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    save_adapter(out, adapter_state_dict(model, spec), peft_config(model, SETTINGS, spec, base_model))
    return model.eval()


def bundle_and_adapter(model_dir: Path, root: Path, name: str) -> tuple[Path, Path, EdgeModel]:
    bundle = tiny_bundle(model_dir, root / "bundles", name)
    model = trained_adapter(load_edge_model(bundle), root / "adapter", name)
    return bundle, root / "adapter", model
