"""The U-shaped split step and split inference, independent of how the middle is reached.

A :class:`MiddleLink` is whatever runs the cloud's blocks: :class:`RemoteMiddle` over the training
stream, or :class:`LocalMiddle` in-process (tests and benchmarks use it as the reference path).
Token ids, labels, logits and the loss never leave this module's caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from edge.rpc.client import TrainStream
from emulator.data.datasets import IGNORE, EvalExample
from emulator.data.scoring import predict
from emulator.model.segments import EdgeModel
from protocol.accounting import Traffic
from protocol.types import Phase


class MiddleLink(Protocol):
    def forward(self, step: int, hidden: torch.Tensor, train: bool, traffic: Traffic) -> tuple[torch.Tensor, float]:
        """Hidden at the lower cut ``(batch, seq, hidden)`` -> hidden at the upper cut, cloud seconds."""
        ...

    def backward(self, step: int, grad: torch.Tensor, traffic: Traffic) -> tuple[torch.Tensor, float]:
        """Gradient at the upper cut -> gradient at the lower cut, cloud seconds."""
        ...


@dataclass
class RemoteMiddle:
    """The cloud's middle blocks over a session's training stream."""

    stream: TrainStream
    wire_dtype: str = "float32"

    def forward(self, step, hidden, train, traffic):
        phase = Phase.FORWARD_TRAIN if train else Phase.FORWARD_EVAL
        return self.stream.exchange(step, phase, hidden, traffic, self.wire_dtype)

    def backward(self, step, grad, traffic):
        return self.stream.exchange(step, Phase.BACKWARD, grad, traffic, self.wire_dtype)


class LocalMiddle:
    """The middle blocks in this process: same interface, no network (reference path).

    The middle runs in its own parameters' dtype (e.g. a bf16 emulator); hidden states and gradients
    are cast in and come back in fp32, as they would from the cloud.
    """

    def __init__(self, middle: nn.Module) -> None:
        self.middle = middle
        self.dtype = next(middle.parameters()).dtype
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, step, hidden, train, traffic):
        if not train:
            with torch.no_grad():
                return self.middle(hidden.to(self.dtype)).float(), 0.0
        inputs = hidden.detach().to(self.dtype).requires_grad_(True)
        out = self.middle(inputs)
        self._pending = (inputs, out)
        return out.detach().float(), 0.0

    def backward(self, step, grad, traffic):
        assert self._pending is not None, "backward without forward"
        inputs, out = self._pending
        self._pending = None
        # .backward, not autograd.grad: the FLOP counter's module hooks do not support autograd.grad
        # on a leaf. A frozen middle (requires_grad False) accumulates nothing but the input gradient.
        out.backward(grad.to(out.dtype))
        assert inputs.grad is not None
        return inputs.grad.float(), 0.0


def completion_loss(model: EdgeModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, computing logits only there.

    Args:
        hidden: ``(batch, seq, hidden)`` states at the upper cut.
        labels: ``(batch, seq)``; ``labels[:, t]`` is the target predicted from position ``t-1``.
    """
    features = model.top.features(hidden)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logits = model.top.lm_head(features[mask])
    return F.cross_entropy(logits.float(), targets[mask])


@dataclass
class StepOutput:
    loss: float
    compute_s: float


def split_step(model: EdgeModel, link: MiddleLink, step: int, input_ids: torch.Tensor, labels: torch.Tensor,
               traffic: Traffic) -> StepOutput:
    """One training step's forward and backward (the caller steps the optimizer).

    Two round trips: hidden up / hidden down, then gradient up / gradient down.
    """
    lower = model.bottom(input_ids)
    upper, compute_up = link.forward(step, lower.detach(), True, traffic)
    upper.requires_grad_(True)
    loss = completion_loss(model, upper, labels)
    loss.backward()
    assert upper.grad is not None
    grad_lower, compute_down = link.backward(step, upper.grad, traffic)
    lower.backward(grad_lower)
    return StepOutput(loss.item(), compute_up + compute_down)


@torch.no_grad()
def split_logits(model: EdgeModel, link: MiddleLink, input_ids: torch.Tensor, traffic: Traffic) -> torch.Tensor:
    """Full ``(batch, seq, vocab)`` logits by split inference."""
    upper, _ = link.forward(0, model.bottom(input_ids), False, traffic)
    return model.top(upper)


@torch.no_grad()
def score_examples(model: EdgeModel, link: MiddleLink, examples: list[EvalExample], pad_id: int,
                   traffic: Traffic) -> list[int]:
    """Predicted choice per example by split inference (see :mod:`emulator.data.scoring`)."""

    def features(ids: torch.Tensor) -> torch.Tensor:
        upper, _ = link.forward(0, model.bottom(ids), False, traffic)
        return model.top.features(upper)

    return predict(examples, features, model.top.lm_head, pad_id)
