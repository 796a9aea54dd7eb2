"""The one table of architecture differences.

Every place in edgetune that needs to know where a family keeps its blocks, norms, embeddings
or LoRA targets looks it up here, by ``config.model_type``. Adding a family means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn
from transformers import PretrainedConfig


class Positions(Enum):
    """How a family injects position information."""

    ROTARY = "rotary"  # cos/sin computed by a parameter-free module, passed to every block
    LEARNED = "learned"  # absolute position embedding added to the token embedding (GPT-2)
    LEARNED_OFFSET = "learned_offset"  # OPT: learned positions with an offset of 2


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps its parts, as dotted attribute paths from the ``*ForCausalLM`` root.

    Attributes:
        blocks: the ``nn.ModuleList`` of decoder blocks.
        embed_tokens: token embedding.
        final_norm: norm applied after the last block (``None`` when the family has none).
        lm_head: output projection to the vocabulary.
        positions: the position scheme, see :class:`Positions`.
        pos_module: rotary module or learned position embedding.
        project_in / project_out: optional projections around the blocks (OPT-350m style).
        embed_dropout: dropout applied after the embedding sum (GPT-2), if any.
        lora_targets: default LoRA target projections inside a block.
        all_linear: every linear projection inside a block, for ``--lora-targets all``.
        block_takes_position_ids: whether blocks accept ``position_ids``.
        lora_fan_in_fan_out: PEFT's ``fan_in_fan_out`` for this family's projections.
        lora_shared_inputs: groups of sibling projections a block calls on the very same tensor
            (LLaMA's q/k/v on the normed hidden state); dlora sends that tensor once per group.
    """

    blocks: str
    embed_tokens: str
    final_norm: str | None
    lm_head: str
    positions: Positions
    pos_module: str
    lora_targets: tuple[str, ...]
    all_linear: tuple[str, ...]
    project_in: str | None = None
    project_out: str | None = None
    embed_dropout: str | None = None
    block_takes_position_ids: bool = False
    lora_fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed
    lora_shared_inputs: tuple[tuple[str, ...], ...] = ()


_LLAMA = ArchSpec(
    blocks="model.layers",
    embed_tokens="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    positions=Positions.ROTARY,
    pos_module="model.rotary_emb",
    lora_targets=("q_proj", "v_proj"),
    all_linear=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    block_takes_position_ids=True,
    lora_shared_inputs=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchSpec(
        blocks="transformer.h",
        embed_tokens="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        positions=Positions.LEARNED,
        pos_module="transformer.wpe",
        embed_dropout="transformer.drop",
        lora_targets=("c_attn",),
        all_linear=("c_attn", "c_proj", "c_fc"),
        lora_fan_in_fan_out=True,
    ),
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        embed_tokens="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        positions=Positions.LEARNED_OFFSET,
        pos_module="model.decoder.embed_positions",
        project_in="model.decoder.project_in",
        project_out="model.decoder.project_out",
        lora_targets=("q_proj", "v_proj"),
        all_linear=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        block_takes_position_ids=True,
        lora_shared_inputs=(("q_proj", "k_proj", "v_proj"),),
    ),
}


class UnsupportedArchitectureError(ValueError):
    """The model's family has no row in :data:`ARCHITECTURES`."""


def arch_for(config: PretrainedConfig) -> ArchSpec:
    """Returns the table row for a model config.

    Raises:
        UnsupportedArchitectureError: naming the supported families.
    """
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model type {config.model_type!r} is not supported (supported: {known})"
        )
    return spec


def get_submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    """Follows a dotted path; ``None`` when the path is ``None`` or the attribute is ``None``."""
    if path is None:
        return None
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def num_blocks(config: PretrainedConfig) -> int:
    """Number of decoder blocks of a causal-LM config (``n_layer`` for GPT-2)."""
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


def hidden_size(config: PretrainedConfig) -> int:
    """Width of the hidden states that cross a cut (``n_embd`` for GPT-2)."""
    return int(getattr(config, "hidden_size", None) or config.n_embd)
