"""Remote LoRA sites: the cloud runs its frozen blocks, the LoRA branch of each site runs elsewhere.

In dlora mode every LoRA module stays on the edge, including those of the cloud-held middle
blocks. :func:`plan_remote_sites` lists those sites (the target projections of the middle blocks),
grouped by the tensor they read: LLaMA's ``q_proj``/``v_proj`` both read the normed hidden state,
so one block's attention sites form one group and cost one exchange per direction per step.

:func:`install_site_taps` wraps each site's projection once in a :class:`SiteTap` (sharing the frozen
weights); a forward run inside :meth:`RemoteSiteCalls.routed` makes its active sites compute
``base(x) + delta`` where ``delta`` comes from a :class:`SiteExchange`, forward and backward, while
any other forward through the same blocks computes ``base(x)``:

* forward: ``exchange.forward(group, x)`` -> the group's LoRA outputs, ``(batch, seq, sum(out))``;
* backward: ``exchange.backward(group, grad_delta)`` -> the gradient w.r.t. ``x`` through the LoRA
  branch, ``(batch, seq, in)``; the LoRA weight gradients accumulate wherever the weights live.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
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


# The routes of the forward running in this thread: (block, path in block) -> (group call, output slice).
_ROUTES: ContextVar[dict[tuple[int, str], tuple[GroupCall, slice]] | None] = ContextVar("_ROUTES", default=None)


_INSTALL_LOCK = threading.Lock()


class SiteTap(nn.Module):
    """A frozen projection whose site, when the running forward routes it, adds a remote LoRA output.

    Outside a :meth:`RemoteSiteCalls.routed` context (split sessions, sites not active this step)
    it computes exactly ``base(x)``.
    """

    def __init__(self, base: nn.Module, block: int, path: str) -> None:
        super().__init__()
        self.base = base
        self.key = (block, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routes = _ROUTES.get()
        route = routes.get(self.key) if routes else None
        if route is None:
            return self.base(x)
        call, slot = route
        return self.base(x) + call.delta(x, slot)


def install_site_taps(stack: BlockStack, groups: Sequence[SiteGroup]) -> int:
    """Puts a :class:`SiteTap` around every site projection of ``groups`` in ``stack``, once.

    The taps share the frozen weights and change no output until a forward routes them, so one
    stack serves every session: no per-step copy. Idempotent; returns how many taps it added.
    """
    with _INSTALL_LOCK:  # two sessions opening at once must not wrap one projection twice
        return _install(stack, groups)


def _install(stack: BlockStack, groups: Sequence[SiteGroup]) -> int:
    added = 0
    for group in groups:
        block = stack.layers[str(group.block)]
        for site in group.sites:
            parent_path, _, leaf = site.path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            if not isinstance(getattr(parent, leaf), SiteTap):
                setattr(parent, leaf, SiteTap(getattr(parent, leaf), group.block, site.path))
                added += 1
    return added


class _Timed:
    """A :class:`SiteExchange` that adds the seconds spent in each call to its owner's ``waited_s``."""

    def __init__(self, owner: RemoteSiteCalls) -> None:
        self.owner = owner

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.owner.exchange.forward(group, x)
        finally:
            self.owner.waited_s += time.perf_counter() - start

    def backward(self, group: SiteGroup, grad: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.owner.exchange.backward(group, grad)
        finally:
            self.owner.waited_s += time.perf_counter() - start


class RemoteSiteCalls:
    """The remote sites of one forward (and its backward): which are active and where they run.

    Passed to :meth:`emulator.model.runner.SegmentRunner.forward` as ``sites``.

    Args:
        groups: the session's site groups, from :func:`plan_remote_sites`.
        active: indices of the sites computed now; a site not in it contributes nothing and costs
            no exchange, and a group without active sites is not touched at all.
        exchange: where the LoRA branches run (the edge); its backward is called from the graph.
    """

    def __init__(self, groups: Sequence[SiteGroup], active: Collection[int], exchange: SiteExchange) -> None:
        self.groups = list(groups)
        self.live = [g for g in (group.restrict(active) for group in groups) if g.sites]
        self.exchange = exchange
        self.waited_s = 0.0

    def prepare(self, segment: nn.Module) -> None:
        assert isinstance(segment, BlockStack)
        install_site_taps(segment, self.groups)

    @contextmanager
    def routed(self) -> Iterator[None]:
        timed: SiteExchange = _Timed(self)
        routes = {}
        for group in self.live:
            call, start = GroupCall(group, timed), 0
            for site in group.sites:
                routes[(group.block, site.path)] = (call, slice(start, start + site.out_features))
                start += site.out_features
        token = _ROUTES.set(routes)
        try:
            yield
        finally:
            _ROUTES.reset(token)


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 uses transformers' Conv1D, which LoRA adapts like nn.Linear.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
