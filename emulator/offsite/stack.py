"""The emulator as modules: kept middle blocks, run in an order that may repeat them, plus bridges.

An :class:`EmulatorStack` is a :class:`~emulator.model.segments.BlockStack` (its ``layers`` are the
kept blocks under their full-model index) with two additions:

* ``order`` — the run order, as keys: ``"<i>"`` runs kept block ``i``; ``"b<j>"`` runs bridge ``j``.
  A block may appear several times (layer sharing, CRaSh): its weights are stored and shipped once.
* ``bridges`` — small trained maps, each standing in for a run of dropped blocks:
  ``h + up(down(h))``, ``(batch, seq, hidden)`` to the same shape, rank ``r`` (``2 * hidden * r``
  parameters; zero-initialised ``up``, so an untrained bridge is the identity, i.e. plain layer drop).

:func:`emulator_modules` rebuilds either kind from the blocks of a model (or a meta-device skeleton)
and the emulator's metadata (``blocks``, and ``order`` / ``bridge_rank`` when present).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from emulator.model.arch import hidden_size
from emulator.model.segments import BlockStack, extract_blocks, run_blocks


class Bridge(nn.Module):
    """A residual low-rank map ``h + up(down(h))`` standing in for dropped blocks."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor, **_: object) -> torch.Tensor:
        """``hidden``: ``(batch, seq, hidden)``; position inputs that blocks take are ignored."""
        return hidden + self.up(self.down(hidden))


class EmulatorStack(BlockStack):
    """Kept blocks run in ``order`` (keys may repeat), with bridges between them.

    Args:
        blocks: ``{full_model_index: block}`` of the kept blocks (copied).
        order: run order, ``"<i>"`` for block ``i`` and ``"b<j>"`` for bridge ``j``.
        bridges: ``{j: Bridge}`` (copied).
    """

    def __init__(self, blocks: dict[int, nn.Module], spec, rotary: nn.Module | None, order: list[str],
                 bridges: Mapping[int, nn.Module] | None = None) -> None:
        super().__init__(blocks, spec, rotary)
        self.bridges = nn.ModuleDict({str(j): b for j, b in (bridges or {}).items()})
        unknown = [k for k in order if (k[1:] not in self.bridges if k.startswith("b") else k not in self.layers)]
        if unknown:
            raise ValueError(f"emulator order names unknown blocks or bridges: {unknown}")
        self.order = list(order)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Runs the order. ``hidden``: ``(batch, seq, hidden)``; returns the same shape."""
        steps = [self.bridges[k[1:]] if k.startswith("b") else self.layers[k] for k in self.order]
        return run_blocks(steps, hidden, self.spec, self.rotary)


def with_order(stack: BlockStack, order: list[str], hidden: int, bridge_rank: int = 0) -> EmulatorStack:
    """A new :class:`EmulatorStack` of ``stack``'s blocks run in ``order``; one fresh bridge (width
    ``hidden``, rank ``bridge_rank``, identity at start) per ``"b<j>"`` key."""
    bridges = {int(k[1:]): Bridge(hidden, bridge_rank) for k in order if k.startswith("b")}
    if bridges and bridge_rank < 1:
        raise ValueError("an order with bridges needs bridge_rank >= 1")
    blocks = {int(k): stack.layers[k] for k in stack.layers.keys()}
    return EmulatorStack(blocks, stack.spec, stack.rotary, order, bridges)


def emulator_modules(model: nn.Module, meta: dict) -> BlockStack:
    """The emulator's structure (weights copied from ``model``'s blocks; overwrite them with the stored
    ones) from its metadata: a plain :class:`BlockStack` unless ``meta`` has an ``order``."""
    stack = extract_blocks(model, list(meta["blocks"]))  # type: ignore[arg-type]
    if not meta.get("order"):
        return stack
    return with_order(stack, list(meta["order"]), hidden_size(model.config),  # type: ignore[arg-type]
                      int(meta.get("bridge_rank") or 0))


def unique_parameters(stack: BlockStack) -> int:
    """Parameters the emulator holds (each shared block counted once, bridges included)."""
    return sum(p.numel() for p in stack.parameters())
