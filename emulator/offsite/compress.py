"""Lossy compression of the cloud's middle blocks into an Offsite-Tuning emulator.

Every function takes a :class:`~emulator.model.segments.BlockStack` and returns a new one; the input is
never modified (blocks are copied). The emulator keeps the blocks' full-model names
(``layers.<i>``), so it is always visible which middle block a kept block started from.

* :func:`drop_indices` / :func:`layer_drop` — uniform layer drop: keep ``E`` of the ``n`` middle
  blocks, always the first and the last, at ``round(i * (n - 1) / (E - 1))``.
* :func:`prune_magnitude` — zero the smallest-magnitude fraction of every weight matrix.
* :func:`quantize_weights` — round every weight matrix to a symmetric per-row ``bits``-bit grid
  (simulated: the values are stored in float, but only ``2**bits - 1`` levels per row remain).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from emulator.model.segments import BlockStack


class EmulatorError(ValueError):
    """An emulator that cannot be built as asked (e.g. as deep as the middle it replaces)."""


def drop_indices(n_middle: int, emulator_layers: int) -> list[int]:
    """Positions (0-based, within the middle) of the blocks a uniform layer drop keeps.

    Args:
        n_middle: number of middle blocks ``n``.
        emulator_layers: blocks to keep ``E``, at least 1 and fewer than ``n``.

    Returns:
        ``[round(i * (n - 1) / (E - 1)) for i in range(E)]``; ``[0]`` when ``E == 1``.

    Raises:
        EmulatorError: ``E`` outside ``1..n-1`` (an emulator as deep as the middle would hand out
            the whole middle).
    """
    if not 1 <= emulator_layers < n_middle:
        raise EmulatorError(
            f"--emulator-layers {emulator_layers}: an emulator must have 1..{n_middle - 1} blocks, fewer "
            f"than the {n_middle} middle blocks it replaces (handing out all of them gives away the model)"
        )
    if emulator_layers == 1:
        return [0]
    # Python's round (halves to even), exactly as in the formula.
    return [round(i * (n_middle - 1) / (emulator_layers - 1)) for i in range(emulator_layers)]


def layer_drop(middle: BlockStack, emulator_layers: int) -> BlockStack:
    """A copy of the middle that keeps only ``E`` uniformly spaced blocks (first and last included)."""
    indices = middle.indices
    keep = [indices[p] for p in drop_indices(len(indices), emulator_layers)]
    return BlockStack({i: middle.layers[str(i)] for i in keep}, middle.spec, middle.rotary)


def _weight_matrices(stack: nn.Module) -> list[torch.Tensor]:
    """The 2-D weight matrices of the blocks (linear projections; norms and biases are left alone)."""
    return [p for name, p in stack.named_parameters() if name.endswith("weight") and p.dim() == 2]


def prune_magnitude(stack: BlockStack, sparsity: float) -> BlockStack:
    """A copy of ``stack`` with the ``sparsity`` fraction of each weight matrix's smallest |w| set to 0."""
    if not 0.0 <= sparsity < 1.0:
        raise EmulatorError(f"--sparsity {sparsity}: must be in [0, 1)")
    pruned = copy.deepcopy(stack)
    with torch.no_grad():
        for weight in _weight_matrices(pruned):
            k = int(weight.numel() * sparsity)
            if k == 0:
                continue
            threshold = weight.abs().flatten().kthvalue(k).values
            weight.masked_fill_(weight.abs() <= threshold, 0.0)
    return pruned


def quantize_weights(stack: BlockStack, bits: int) -> BlockStack:
    """A copy of ``stack`` whose weight matrices are rounded to a symmetric per-row ``bits``-bit grid.

    Each row ``w`` becomes ``scale * round(w / scale)`` with ``scale = max|w| / (2**(bits-1) - 1)``,
    i.e. at most ``2**bits - 1`` distinct values per row.
    """
    if not 2 <= bits <= 8:
        raise EmulatorError(f"--bits {bits}: choose 2..8 (0 disables quantization)")
    levels = 2 ** (bits - 1) - 1
    quantized = copy.deepcopy(stack)
    with torch.no_grad():
        for weight in _weight_matrices(quantized):
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
            weight.copy_(torch.round(weight / scale).clamp(-levels, levels) * scale)
    return quantized
