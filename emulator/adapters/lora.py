"""LoRA on segments, and the Hugging Face PEFT adapter format that maps them onto the full model.

The edge trains LoRA inside its segments (``bottom.stack.layers.<i>...``); what it saves is an
adapter-only state dict with the full model's names (``base_model.model.model.layers.<i>...``) and
a PEFT ``adapter_config.json`` whose ``target_modules`` name exactly the adapted projections, so
``peft.PeftModel.from_pretrained(full_model, dir)`` puts every LoRA weight where it was trained.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from torch import nn

from emulator.adapters.peft_names import resolve_targets, saved_key, target_leaves
from emulator.model.arch import ArchSpec
from emulator.model.segments import full_model_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
M = TypeVar("M", bound=nn.Module)


class AdapterMismatchError(ValueError):
    """An adapter whose modules do not match the segments it is loaded into."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters shared by every mode."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # empty: the family's default from the architecture table

    def resolved_targets(self, spec: ArchSpec) -> tuple[str, ...]:
        return resolve_targets(self.targets, spec)


def segment_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear projections inside decoder blocks of ``model`` that LoRA adapts."""
    names = []
    for name, module in model.named_modules():
        if ".layers." in name and name.rsplit(".", 1)[-1] in targets and _is_linear(module):
            names.append(name)
    if not names:
        raise AdapterMismatchError(f"--lora-targets {','.join(targets)}: no such projection in this model's "
                                   "blocks; give 'all', '' (the architecture's default) or its own names")
    return names


def add_lora(model: M, settings: LoraSettings, spec: ArchSpec) -> M:
    """Returns a copy of ``model`` with LoRA on its target projections; only LoRA is trainable."""
    model = copy.deepcopy(model)
    targets = segment_targets(model, settings.resolved_targets(spec))
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", fan_in_fan_out=spec.lora_fan_in_fan_out)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters of a segment model, by segment name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def adapter_state_dict(model: nn.Module, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT's saved names for the full model (adapter name dropped)."""
    state = {}
    for name, param in lora_parameters(model).items():
        module_path, _, leaf = name.rpartition(".lora_")  # "...q_proj", "A.default.weight"
        matrix, _adapter, kind = leaf.split(".")
        full = full_model_name(module_path + ".", spec).rstrip(".")
        state[saved_key(full, matrix, kind)] = param.detach().to(torch.float32).clone()
    return state


def peft_config(model: nn.Module, settings: LoraSettings, spec: ArchSpec, base_model: str,
                extra_targets: Sequence[str] = ()) -> LoraConfig:
    """The PEFT config of a LoRA-injected segment model.

    ``target_modules`` lists the full-model names of exactly the adapted projections, plus
    ``extra_targets`` (full-model names adapted elsewhere, e.g. dlora's cloud-held sites).
    """
    targets = sorted({full_model_name(n.rpartition(".lora_")[0] + ".", spec).rstrip(".")
                      for n in lora_parameters(model)} | set(extra_targets))
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM",
                      fan_in_fan_out=spec.lora_fan_in_fan_out,
                      base_model_name_or_path=base_model)


def save_adapter(directory: Path, state: dict[str, torch.Tensor], config: LoraConfig,
                 metadata: dict[str, str] | None = None) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (with ``metadata`` in its header)."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS),
              metadata={**(metadata or {}), "format": "pt"})


def load_adapter_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads an adapter directory (safetensors only, never pickle). Returns ``(state, config_json)``."""
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; an adapter directory holds "
                                    f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return load_file(str(weights_path)), json.loads(config_path.read_text())


def load_into_segments(model: nn.Module, state: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    """Copies PEFT-format LoRA weights into a LoRA-injected segment model (all must match)."""
    by_full = {}
    for name, param in lora_parameters(model).items():
        module_path, _, leaf = name.rpartition(".lora_")
        matrix, _adapter, kind = leaf.split(".")
        full = full_model_name(module_path + ".", spec).rstrip(".")
        by_full[saved_key(full, matrix, kind)] = param
    missing = sorted(set(by_full) - set(state))
    unexpected = sorted(set(state) - set(by_full))
    if missing or unexpected:
        raise AdapterMismatchError(f"adapter does not fit this split (same --edge-layers as in training?): "
                                   f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, param in by_full.items():
            param.copy_(state[key].to(param.dtype))


def with_adapter(model: M, directory: Path, spec: ArchSpec) -> M:
    """A copy of segment ``model`` with LoRA injected as the PEFT adapter in ``directory`` says, loaded."""
    state, config = load_adapter_state(directory)
    settings = LoraSettings(config["r"], config["lora_alpha"], 0.0, target_leaves(config["target_modules"]))
    adapted = add_lora(model, settings, spec)
    load_into_segments(adapted, state, spec)
    return adapted


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 uses transformers' Conv1D, which PEFT's LoRA supports like nn.Linear.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
