"""dlora on the cloud: the frozen middle blocks with every active LoRA site answered by the edge.

The cloud never holds a LoRA weight of a dlora session. For each step it wires the session's
active sites into a copy of the middle (:func:`emulator.adapters.remote_sites.attach_remote_sites`) whose
exchange is :class:`EdgeSiteExchange`: a call-out over the session's training stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cloud.backbone.conversation import Answer, Callout, CalloutFn
from cloud.backbone.local import LocalBackbone, PendingBackward
from cloud.errors import InvalidArgument
from emulator.adapters.remote_sites import SiteGroup, attach_remote_sites
from emulator.model.segments import BlockStack
from protocol.types import Phase


@dataclass(frozen=True)
class EdgeSiteExchange:
    """Site exchanges of one step over the stream; checks every answer before it enters the graph."""

    callout: CalloutFn
    step: int

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        answer = self.callout(Callout(Phase.SITE_INPUT, group.index, x))
        return self._check(answer, Phase.SITE_OUTPUT, group, (*x.shape[:-1], group.out_features))

    def backward(self, group: SiteGroup, grad: torch.Tensor) -> torch.Tensor:
        answer = self.callout(Callout(Phase.SITE_GRAD_OUTPUT, group.index, grad))
        return self._check(answer, Phase.SITE_GRAD_INPUT, group, (*grad.shape[:-1], group.in_features))

    def _check(self, answer: Answer, phase: Phase, group: SiteGroup, shape: tuple[int, ...]) -> torch.Tensor:
        where = f"step {self.step}, site group {group.index} (block {group.block})"
        if answer.phase is not phase or answer.site_group != group.index:
            raise InvalidArgument(f"{where}: expected {phase.name} for group {group.index}, got "
                                  f"{answer.phase.name} for group {answer.site_group}")
        if tuple(answer.tensor.shape) != shape:
            raise InvalidArgument(f"{where}: {phase.name} must have shape {shape}, got {tuple(answer.tensor.shape)}")
        if not torch.isfinite(answer.tensor).all():
            raise InvalidArgument(f"{where}: {phase.name} contains NaN or Inf; lower the learning rate "
                                  "or enable gradient clipping")
        return answer.tensor


class DloraBackbone:
    """The frozen middle blocks of a dlora session and the session's remote sites.

    Args:
        middle: the shared frozen middle (the backbone's dtype); never modified.
        groups: the session's site groups, from :func:`emulator.adapters.remote_sites.plan_remote_sites`.
    """

    def __init__(self, middle: BlockStack, groups: Sequence[SiteGroup]) -> None:
        self.middle = middle
        self.dtype = next(middle.parameters()).dtype  # the shared middle's; never converted per session
        self.groups = list(groups)
        self.n_sites = sum(len(g.sites) for g in self.groups)

    def check_active(self, active: Sequence[int], step: int) -> frozenset[int]:
        """The active-site indices of a forward, validated against the session's sites."""
        bad = [i for i in active if i >= self.n_sites]
        if bad or len(set(active)) != len(active):
            raise InvalidArgument(f"step {step}: active sites {list(active)[:8]} must be distinct indices "
                                  f"below {self.n_sites} (see SessionInfo.remote_sites)")
        return frozenset(active)

    def forward(self, hidden: torch.Tensor, keep_graph: bool, active: frozenset[int],
                exchange: EdgeSiteExchange) -> tuple[torch.Tensor, PendingBackward | None, float]:
        """Like :meth:`LocalBackbone.forward`, with the active sites' LoRA outputs from the edge."""
        stack = attach_remote_sites(self.middle, self.groups, active, exchange)
        return LocalBackbone(stack, self.dtype).forward(hidden, keep_graph)

    def backward(self, pending: PendingBackward, grad_out: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Backward through the graph of the forward; its site exchanges call out to the edge again."""
        (grad_in,) = torch.autograd.grad(pending.outputs, pending.inputs, grad_out.to(pending.outputs.dtype))
        return grad_in.float(), 0.0
