"""Plugging an adapter trained at the edge back into the full model, and applying it to edge segments.

An offsite adapter comes in one of two formats, both keyed by full-model names:

* ``lora`` — the PEFT format of :mod:`emulator.adapters.lora` (``adapter_config.json`` +
  ``adapter_model.safetensors``), from LoRA on the adapter blocks (``--tune lora``, the default).
* ``delta`` — ``delta_config.json`` + ``delta_model.safetensors``: ``tuned - original`` for every
  parameter of the adapter blocks (``--tune full``), e.g. ``model.layers.0.mlp.up_proj.weight``.

Every function returns new modules; none modifies the model it is given.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import cast

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from emulator.adapters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraSettings,
    add_lora,
    load_adapter_state,
    load_into_segments,
)
from emulator.adapters.peft_names import saved_module, target_leaves
from emulator.model.arch import ArchSpec, get_submodule
from emulator.model.segments import EdgeModel, full_model_name

DELTA_CONFIG = "delta_config.json"
DELTA_WEIGHTS = "delta_model.safetensors"
DELTA_FORMAT = "edgetune-delta"
FORMAT_FILES = {"lora": (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "delta": (DELTA_CONFIG, DELTA_WEIGHTS)}


def adapter_format(directory: Path) -> str:
    """``"lora"`` or ``"delta"``, from the files in ``directory``."""
    for name, files in FORMAT_FILES.items():
        if all((directory / f).is_file() for f in files):
            return name
    raise FileNotFoundError(f"{directory}: neither a PEFT LoRA adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}) "
                            f"nor a block delta ({DELTA_CONFIG}, {DELTA_WEIGHTS})")


def block_parameters(edge: EdgeModel) -> dict[str, nn.Parameter]:
    """The parameters of the adapter blocks (first and last K), by segment name: what ``--tune full`` trains."""
    return {n: p for n, p in edge.named_parameters() if n.startswith(("bottom.stack.layers.", "top.stack.layers."))}


def delta_state_dict(tuned: EdgeModel, base: EdgeModel, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """``tuned - base`` for every adapter-block parameter, under full-model names (fp32)."""
    base_params = block_parameters(base)
    return {full_model_name(n, spec): (p.detach().float() - base_params[n].detach().float()).contiguous()
            for n, p in block_parameters(tuned).items()}


def save_delta(directory: Path, state: dict[str, torch.Tensor], base_model: str) -> None:
    """Writes ``delta_config.json`` and ``delta_model.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": DELTA_FORMAT, "base_model_name_or_path": base_model, "parameters": sorted(state)}
    (directory / DELTA_CONFIG).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / DELTA_WEIGHTS), metadata={"format": "pt"})


def load_delta(directory: Path) -> dict[str, torch.Tensor]:
    """Reads a block delta (safetensors only)."""
    config = json.loads((directory / DELTA_CONFIG).read_text())
    if config.get("format") != DELTA_FORMAT:
        raise ValueError(f"{directory / DELTA_CONFIG}: not an {DELTA_FORMAT} file")
    return load_file(str(directory / DELTA_WEIGHTS))


def adapter_state(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory of either format."""
    if adapter_format(directory) == "lora":
        return load_adapter_state(directory)[0]
    return load_delta(directory)


def lora_settings_of(directory: Path) -> LoraSettings:
    """The LoRA settings recorded in a PEFT ``adapter_config.json``."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    return LoraSettings(config["r"], config["lora_alpha"], 0.0, target_leaves(config["target_modules"]))


def apply_to_edge(edge: EdgeModel, directory: Path, spec: ArchSpec) -> EdgeModel:
    """A copy of the edge segments with an adapter of either format applied.

    LoRA comes back injected (trainable LoRA, as :func:`emulator.adapters.lora.add_lora` leaves it); a delta
    comes back added into the block weights.
    """
    if adapter_format(directory) == "lora":
        model = cast(EdgeModel, add_lora(edge, lora_settings_of(directory), spec))
        load_into_segments(model, load_adapter_state(directory)[0], spec)
        return model
    delta, model = load_delta(directory), copy.deepcopy(edge)
    params = {full_model_name(n, spec): p for n, p in block_parameters(model).items()}
    _check_keys(set(params), set(delta))
    with torch.no_grad():
        for name, value in delta.items():
            params[name].add_(value.to(params[name].dtype))
    return model


def check_fits(full: PreTrainedModel, directory: Path) -> None:
    """Checks, without copying the model, that every adapter tensor has a home of the right shape.

    Raises:
        ValueError: naming the first tensor that does not fit.
    """
    state = adapter_state(directory)
    if adapter_format(directory) == "delta":
        params = dict(full.named_parameters())
        for name, value in state.items():
            if name not in params or tuple(params[name].shape) != tuple(value.shape):
                raise ValueError(f"delta tensor {name!r} {tuple(value.shape)} has no such parameter in the model")
        return
    for name, value in state.items():
        module_path, leaf = saved_module(name), name.rpartition(".lora_")[2]
        module = get_submodule(full, module_path)
        if module is None or not hasattr(module, "weight") or value.dim() != 2:
            raise ValueError(f"LoRA tensor {name!r} targets no projection of the model")
        out_features, in_features = _linear_shape(module)
        expected_dim = in_features if leaf.startswith("A") else out_features
        got = value.shape[1] if leaf.startswith("A") else value.shape[0]
        if got != expected_dim:
            raise ValueError(f"LoRA tensor {name!r} {tuple(value.shape)} does not fit {module_path}")


def plug_in(full: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """A new full model with the adapter merged into its weights (``full`` is untouched)."""
    model = copy.deepcopy(full)
    if adapter_format(directory) == "lora":
        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload().eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_delta(directory).items():
            params[name].add_(value.to(params[name].dtype))
    return model.eval()


def export_merged(full: PreTrainedModel, directory: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Writes the plugged-in model as a plain Hugging Face directory (safetensors + tokenizer)."""
    from transformers import AutoTokenizer

    merged = plug_in(full, directory)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    weight = cast(torch.Tensor, module.weight)
    if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def _check_keys(have: set[str], got: set[str]) -> None:
    if have != got:
        raise ValueError(f"delta does not fit these segments (same --edge-layers as in training?): "
                         f"missing {sorted(have - got)[:3]}, unexpected {sorted(got - have)[:3]}")
