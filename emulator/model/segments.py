"""Splitting a causal LM into the three segments of U-shaped split learning.

``split_causal_lm(model, K)`` returns new modules and never modifies ``model``:

* :class:`EdgeBottom` — token embedding (+ positions) and blocks ``0..K-1``: ``(batch, seq)`` ids
  to ``(batch, seq, hidden)`` states.
* :class:`BlockStack` (the cloud's middle) — blocks ``K..N-K-1``: hidden to hidden.
* :class:`EdgeTop` — blocks ``N-K..N-1``, final norm and LM head: hidden to ``(batch, seq, vocab)``.

Blocks keep their original index as their name (``layers.<i>``), so a segment's parameter names
map one-to-one onto the full model's (see :func:`full_model_name`). Sequences are right-padded, so a
plain causal mask is exact for every real token and no padding mask has to cross the wire.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from emulator.model.arch import ArchSpec, Positions, arch_for, get_submodule, num_blocks


class SplitError(ValueError):
    """A split that cannot be made (e.g. the edge would hold every block)."""


@dataclass(frozen=True)
class SplitPlan:
    """Which block indices live where, for a model of ``n_blocks`` blocks and ``edge_layers`` K."""

    n_blocks: int
    edge_layers: int

    def __post_init__(self) -> None:
        if self.edge_layers < 1:
            raise SplitError(f"--edge-layers must be at least 1 (got {self.edge_layers})")
        if 2 * self.edge_layers >= self.n_blocks:
            raise SplitError(
                f"--edge-layers {self.edge_layers} leaves no middle blocks for the cloud in a "
                f"{self.n_blocks}-block model; use at most {(self.n_blocks - 1) // 2}"
            )

    @property
    def bottom(self) -> list[int]:
        return list(range(self.edge_layers))

    @property
    def middle(self) -> list[int]:
        return list(range(self.edge_layers, self.n_blocks - self.edge_layers))

    @property
    def top(self) -> list[int]:
        return list(range(self.n_blocks - self.edge_layers, self.n_blocks))

    @property
    def edge(self) -> list[int]:
        return self.bottom + self.top


def causal_mask(seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask of shape ``(1, 1, seq, seq)``: 0 on and below the diagonal, min above."""
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


class BlockStack(nn.Module):
    """A contiguous run of decoder blocks, named by their index in the full model.

    Args:
        blocks: ``{full_model_index: block}``; copied, never shared with the source model.
        spec: the family's row in the architecture table.
        rotary: the family's rotary module (``None`` for learned positions).
    """

    def __init__(self, blocks: dict[int, nn.Module], spec: ArchSpec, rotary: nn.Module | None):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict({str(i): copy.deepcopy(b) for i, b in blocks.items()})
        self.rotary = copy.deepcopy(rotary) if rotary is not None else None

    @property
    def indices(self) -> list[int]:
        return [int(k) for k in self.layers.keys()]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs the blocks. ``hidden``: ``(batch, seq, hidden)``; returns the same shape."""
        return run_blocks(self.layers.values(), hidden, self.spec, self.rotary)


def run_blocks(
    blocks: Iterable[nn.Module], hidden: torch.Tensor, spec: ArchSpec, rotary: nn.Module | None
) -> torch.Tensor:
    """Applies blocks in order with a causal mask and the family's position inputs."""
    seq = hidden.shape[1]
    position_ids = torch.arange(seq, device=hidden.device)[None]
    kwargs: dict[str, object] = {"attention_mask": causal_mask(seq, hidden.dtype, hidden.device)}
    if rotary is not None:
        kwargs["position_embeddings"] = rotary(hidden, position_ids)
    if spec.block_takes_position_ids:
        kwargs["position_ids"] = position_ids
    for block in blocks:
        out = block(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class EdgeBottom(nn.Module):
    """Embedding and the first K blocks: ``(batch, seq)`` token ids to ``(batch, seq, hidden)``."""

    def __init__(self, model: PreTrainedModel, blocks: list[int]):
        super().__init__()
        spec = arch_for(model.config)
        self.spec = spec
        self.embed_tokens = _copy_required(model, spec.embed_tokens)
        self.project_in = _copy(model, spec.project_in)
        self.embed_dropout = _copy(model, spec.embed_dropout)
        self.pos_embed = _copy(model, spec.pos_module) if spec.positions is not Positions.ROTARY else None
        self.stack = BlockStack(_pick(model, blocks), spec, _rotary(model, spec))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if self.pos_embed is not None and self.spec.positions is Positions.LEARNED:
            hidden = hidden + self.pos_embed(position_ids)
        elif self.pos_embed is not None and self.spec.positions is Positions.LEARNED_OFFSET:
            hidden = hidden + self.pos_embed(None, 0, position_ids=position_ids)
        if self.embed_dropout is not None:
            hidden = self.embed_dropout(hidden)
        return self.stack(hidden)


class EdgeTop(nn.Module):
    """The last K blocks, final norm and LM head: ``(batch, seq, hidden)`` to ``(batch, seq, vocab)``."""

    def __init__(self, model: PreTrainedModel, blocks: list[int]):
        super().__init__()
        spec = arch_for(model.config)
        self.stack = BlockStack(_pick(model, blocks), spec, _rotary(model, spec))
        self.final_norm = _copy(model, spec.final_norm)
        self.project_out = _copy(model, spec.project_out)
        self.lm_head = _copy_required(model, spec.lm_head)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """States just before the LM head, ``(batch, seq, hidden)``: lets callers project only
        the positions they need (a completion's few tokens instead of every position)."""
        hidden = self.stack(hidden)
        if self.final_norm is not None:
            hidden = self.final_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.features(hidden))


class EdgeModel(nn.Module):
    """What the edge holds: both ends of the U. Submodules ``bottom`` and ``top`` export separately."""

    def __init__(self, bottom: EdgeBottom, top: EdgeTop):
        super().__init__()
        self.bottom = bottom
        self.top = top


@dataclass
class SplitModel:
    """The three segments of one model and the plan that produced them."""

    plan: SplitPlan
    edge: EdgeModel
    middle: BlockStack


def plan_for(config: PretrainedConfig, edge_layers: int) -> SplitPlan:
    """The split plan of a config for K edge layers (validates K)."""
    return SplitPlan(num_blocks(config), edge_layers)


def split_causal_lm(model: PreTrainedModel, edge_layers: int) -> SplitModel:
    """Splits a causal LM into edge (bottom + top) and cloud (middle) segments; ``model`` is untouched."""
    plan = plan_for(model.config, edge_layers)
    return SplitModel(plan, extract_edge(model, plan), extract_middle(model, plan))


def extract_edge(model: PreTrainedModel, plan: SplitPlan) -> EdgeModel:
    """Copies of the embedding, the first and last K blocks, final norm and head."""
    return EdgeModel(EdgeBottom(model, plan.bottom), EdgeTop(model, plan.top))


def extract_middle(model: PreTrainedModel, plan: SplitPlan) -> BlockStack:
    """A copy of the cloud-held middle blocks."""
    return extract_blocks(model, plan.middle)


def extract_blocks(model: PreTrainedModel, indices: list[int]) -> BlockStack:
    """A copy of the blocks at ``indices`` (full-model numbering), run in that order."""
    spec = arch_for(model.config)
    return BlockStack(_pick(model, indices), spec, _rotary(model, spec))


_SEGMENT_BLOCK = re.compile(r"^(?:bottom\.|top\.)?stack\.layers\.(\d+)\.")


def full_model_name(segment_name: str, spec: ArchSpec) -> str:
    """Maps a block parameter name inside a segment to its name in the full model.

    ``bottom.stack.layers.3.self_attn.q_proj`` -> ``model.layers.3.self_attn.q_proj`` (LLaMA).
    """
    m = _SEGMENT_BLOCK.match(segment_name)
    if m is None:
        raise KeyError(f"{segment_name!r} is not inside a decoder block")
    return f"{spec.blocks}.{m.group(1)}.{segment_name[m.end():]}"


def _copy(model: nn.Module, path: str | None) -> nn.Module | None:
    module = get_submodule(model, path)
    return copy.deepcopy(module) if module is not None else None


def _copy_required(model: nn.Module, path: str) -> nn.Module:
    module = get_submodule(model, path)
    if module is None:
        raise SplitError(f"model has no {path!r}; is the architecture table row right?")
    return copy.deepcopy(module)


def _pick(model: PreTrainedModel, indices: list[int]) -> dict[int, nn.Module]:
    blocks = get_submodule(model, arch_for(model.config).blocks)
    assert isinstance(blocks, nn.ModuleList)
    return {i: blocks[i] for i in indices}


def _rotary(model: PreTrainedModel, spec: ArchSpec) -> nn.Module | None:
    return get_submodule(model, spec.pos_module) if spec.positions is Positions.ROTARY else None
