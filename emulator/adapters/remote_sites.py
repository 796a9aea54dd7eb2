"""Remote LoRA sites: the cloud runs its frozen blocks, the LoRA branch of each site runs elsewhere.

In dlora mode every LoRA module stays on the edge, including those of the cloud-held middle
blocks. :func:`plan_remote_sites` lists those sites (the target projections of the middle blocks),
grouped by the tensor they read: LLaMA's ``q_proj``/``v_proj`` both read the normed hidden state,
so one block's attention sites form one group and cost one exchange per direction per step.

:func:`attach_remote_sites` is pure surgery: it returns a new :class:`BlockStack` (sharing the frozen
weights, copying only the touched blocks' module structure) whose active sites compute
``base(x) + delta`` where ``delta`` comes from a :class:`SiteExchange`, forward and backward:

* forward: ``exchange.forward(group, x)`` -> the group's LoRA outputs, ``(batch, seq, sum(out))``;
* backward: ``exchange.backward(group, grad_delta)`` -> the gradient w.r.t. ``x`` through the LoRA
  branch, ``(batch, seq, in)``; the LoRA weight gradients accumulate wherever the weights live.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from emulator.model.arch import ArchSpec, arch_for, get_submodule
from emulator.model.segments import BlockStack, SplitPlan


class RemoteSiteError(ValueError):
    """Sites that cannot be planned or wired (unknown targets, inputs that are not shared)."""


@dataclass(frozen=True)
class RemoteSite:
    """One cloud-held LoRA site.

    Attributes:
        index: position in the session's site list (what ``active_sites`` indexes on the wire).
        name: full-model module name, e.g. ``model.layers.5.self_attn.q_proj``.
        block: full-model block index.
        path: the projection's path inside its block, e.g. ``self_attn.q_proj``.
        in_features / out_features: the projection's input and output widths.
    """

    index: int
    name: str
    block: int
    path: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class SiteGroup:
    """Sites of one block that read the same tensor: one exchange per direction per step."""

    index: int
    block: int
    sites: tuple[RemoteSite, ...]

    @property
    def in_features(self) -> int:
        return self.sites[0].in_features

    @property
    def out_features(self) -> int:
        """Width of the concatenated LoRA outputs of the group's sites."""
        return sum(s.out_features for s in self.sites)

    def restrict(self, active: Collection[int]) -> SiteGroup:
        """The same group with only the sites whose index is in ``active`` (possibly none)."""
        return replace(self, sites=tuple(s for s in self.sites if s.index in active))


def flatten(groups: Sequence[SiteGroup]) -> list[RemoteSite]:
    """Every site of ``groups`` in index order."""
    return sorted((s for g in groups for s in g.sites), key=lambda s: s.index)


def plan_remote_sites(model: PreTrainedModel, plan: SplitPlan, targets: Sequence[str]) -> list[SiteGroup]:
    """The LoRA sites of the middle blocks of ``plan``, grouped by shared input.

    ``model`` may live on the ``meta`` device: only module types and weight shapes are read, so the
    edge plans the same sites as the cloud without holding the middle blocks.

    Raises:
        RemoteSiteError: when no target projection exists in the middle blocks.
    """
    spec = arch_for(model.config)
    blocks = get_submodule(model, spec.blocks)
    assert isinstance(blocks, nn.ModuleList)
    groups: list[SiteGroup] = []
    counter = itertools.count()
    for block_index in plan.middle:
        found = _block_sites(blocks[block_index], targets, spec)
        for paths in _group_paths(found, spec).values():
            sites = tuple(RemoteSite(next(counter), f"{spec.blocks}.{block_index}.{path}", block_index, path,
                                     *found[path]) for path in paths)
            groups.append(SiteGroup(len(groups), block_index, sites))
    if not groups:
        raise RemoteSiteError(f"no LoRA target {list(targets)} in the cloud-held blocks {plan.middle[:3]}...")
    return groups


def _block_sites(block: nn.Module, targets: Sequence[str], spec: ArchSpec) -> dict[str, tuple[int, int]]:
    """``{path inside block: (in_features, out_features)}`` of the block's target projections."""
    found = {}
    for path, module in block.named_modules():
        if path.rsplit(".", 1)[-1] in targets and _is_linear(module):
            shape = tuple(module.weight.shape)  # (out, in); GPT-2's Conv1D stores (in, out)
            found[path] = shape if spec.lora_fan_in_fan_out else shape[::-1]
    return found


def _group_paths(found: dict[str, tuple[int, int]], spec: ArchSpec) -> dict[tuple[str, int], list[str]]:
    """Paths grouped by (parent module, shared-input group of the table); singletons otherwise."""
    groups: dict[tuple[str, int], list[str]] = {}
    for n, path in enumerate(found):
        parent, _, leaf = path.rpartition(".")
        shared = next((i for i, g in enumerate(spec.lora_shared_inputs) if leaf in g), None)
        key = (parent, shared) if shared is not None else (path, -1 - n)
        groups.setdefault(key, []).append(path)
    return groups


class SiteExchange(Protocol):
    """Where the LoRA branches of remote sites are computed (the edge, over the training stream)."""

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(batch, seq, in)`` -> the group's LoRA outputs ``(batch, seq, group.out_features)``."""
        ...

    def backward(self, group: SiteGroup, grad: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the LoRA outputs -> gradient w.r.t. ``x`` through the LoRA branches."""
        ...


class _RemoteDelta(torch.autograd.Function):
    """``delta = exchange.forward(group, x)``, whose backward asks the exchange for ``dL/dx``."""

    @staticmethod
    def forward(ctx, x, exchange, group):  # type: ignore[override]
        ctx.exchange, ctx.group, ctx.dtype = exchange, group, x.dtype
        return exchange.forward(group, x.detach()).to(x.dtype)  # the edge answers in fp32

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.exchange.backward(ctx.group, grad.contiguous()).to(ctx.dtype), None, None


class GroupCall:
    """One exchange serving every active site of a group within one forward.

    HF blocks call ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one by one on the same tensor. The
    first member called makes the exchange for the whole group; the others take their slice of the
    same result. The result is dropped once every member has taken its slice, so nothing outlives
    the block's forward.
    """

    def __init__(self, group: SiteGroup, exchange: SiteExchange) -> None:
        self.group, self.exchange = group, exchange
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._served = 0

    def delta(self, x: torch.Tensor, slot: slice) -> torch.Tensor:
        if self._input is not x:
            if self._input is not None:
                raise RemoteSiteError(f"sites of group {self.group.index} (block {self.group.block}) were called "
                                      "on different tensors; fix lora_shared_inputs in emulator/model/arch.py")
            self._input, self._output, self._served = x, _RemoteDelta.apply(x, self.exchange, self.group), 0
        out = self._output[..., slot]  # type: ignore[index]
        self._served += 1
        if self._served == len(self.group.sites):
            self._input = self._output = None
        return out


class RemoteLoraLinear(nn.Module):
    """A frozen projection plus the LoRA output of its site, computed through a :class:`GroupCall`."""

    def __init__(self, base: nn.Module, call: GroupCall, slot: slice) -> None:
        super().__init__()
        self.base = base
        self.call = call
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.call.delta(x, self.slot)


def attach_remote_sites(stack: BlockStack, groups: Sequence[SiteGroup], active: Collection[int],
                        exchange: SiteExchange) -> BlockStack:
    """A new stack computing ``stack`` plus the remote LoRA output of every active site.

    Args:
        stack: the cloud's frozen middle blocks; not modified, its weights are shared.
        groups: from :func:`plan_remote_sites`.
        active: indices of the sites computed now; a site not in it contributes nothing and costs
            no exchange, and a group without active sites is not touched at all.
        exchange: where the LoRA branches run.
    """
    live = [g for g in (group.restrict(active) for group in groups) if g.sites]
    touched = {str(g.block) for g in live}
    memo: dict[int, object] = {id(t): t for t in itertools.chain(stack.parameters(), stack.buffers())}
    memo.update({id(block): block for name, block in stack.layers.items() if name not in touched})
    new = copy.deepcopy(stack, memo)
    for group in live:
        call, start = GroupCall(group, exchange), 0
        block = new.layers[str(group.block)]
        for site in group.sites:
            parent_path, _, leaf = site.path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            slot = slice(start, start + site.out_features)
            setattr(parent, leaf, RemoteLoraLinear(getattr(parent, leaf), call, slot))
            start = slot.stop
    return new


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 uses transformers' Conv1D, which LoRA adapts like nn.Linear.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
