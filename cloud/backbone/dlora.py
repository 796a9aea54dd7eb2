"""dlora on the cloud: the session's remote LoRA sites, each answered by the edge.

The cloud never holds a LoRA weight of a dlora session. For each step :meth:`SessionSites.calls`
builds the ``sites`` argument of :meth:`cloud.backbone.seam.BackboneRunner.forward`: the active sites
and :class:`EdgeSiteExchange`, a call-out over the session's training stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cloud.backbone.conversation import Answer, Callout, CalloutFn
from cloud.errors import InvalidArgument
from emulator.adapters.remote_sites import RemoteSiteCalls, SiteGroup
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


class SessionSites:
    """The remote LoRA sites of one dlora session.

    Args:
        groups: the session's site groups, from :func:`emulator.adapters.remote_sites.plan_remote_sites`.
    """

    def __init__(self, groups: Sequence[SiteGroup]) -> None:
        self.groups = list(groups)
        self.n_sites = sum(len(g.sites) for g in self.groups)

    def check_active(self, active: Sequence[int], step: int) -> frozenset[int]:
        """The active-site indices of a forward, validated against the session's sites."""
        bad = [i for i in active if i >= self.n_sites]
        if bad or len(set(active)) != len(active):
            raise InvalidArgument(f"step {step}: active sites {list(active)[:8]} must be distinct indices "
                                  f"below {self.n_sites} (see SessionInfo.remote_sites)")
        return frozenset(active)

    def calls(self, active: Sequence[int], step: int, callout: CalloutFn) -> RemoteSiteCalls:
        """The ``sites`` of step ``step``'s forward: the active sites, answered over ``callout``."""
        return RemoteSiteCalls(self.groups, self.check_active(active, step), EdgeSiteExchange(callout, step))
