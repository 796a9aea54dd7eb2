"""The one seam between the coordinator's handlers and the frozen middle: :class:`BackboneRunner`.

Handlers pass handles, never live autograd tensors: a training forward is named by
``(session, step)`` and its graph stays inside the runner until the backward of that step, or until
:meth:`BackboneRunner.release` frees every graph of a session (stream closed, session evicted).
dlora's per-site call-outs to the edge go through the same calls as ``sites``, an object built by
:meth:`cloud.backbone.dlora.SessionSites.calls`. The in-process runner is
:class:`emulator.model.runner.SegmentRunner`; a runner in other processes implements the same three
methods. Handlers never know which one they hold.
"""

from __future__ import annotations

from typing import Protocol

import torch

from emulator.model.runner import RunnerError, SegmentRunner, SiteCalls

__all__ = ["BackboneRunner", "RunnerError", "SiteCalls", "local_runner"]


class BackboneRunner(Protocol):
    """Runs the frozen middle forward, and backward to the input gradient, by handle.

    Errors: a backward without its kept training forward, or with a gradient of another shape than
    the forward's output, raises :class:`RunnerError`.
    """

    def forward(self, session: str, step: int, hidden: torch.Tensor, train: bool,
                sites: SiteCalls | None = None) -> tuple[torch.Tensor, float]:
        """``hidden`` ``(batch, seq, hidden)`` fp32 -> ``(output (batch, seq, hidden) fp32, compute seconds)``.

        ``train`` keeps the graph under ``(session, step)``; ``sites`` (dlora) routes the active
        remote LoRA sites of this step to the edge. Compute seconds exclude the edge's answer time.
        """
        ...

    def backward(self, session: str, step: int, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient at the output of step ``step``'s forward -> ``(gradient at its input, compute seconds)``."""
        ...

    def release(self, session: str) -> int:
        """Frees every graph kept for ``session``; returns how many."""
        ...


def local_runner(segment: torch.nn.Module, dtype: torch.dtype = torch.float32) -> BackboneRunner:
    """The in-process runner of ``segment`` (a copy the runner owns), run in ``dtype``."""
    return SegmentRunner(segment, dtype)
