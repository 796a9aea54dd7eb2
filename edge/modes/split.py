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
from emulator.model.runner import SegmentRunner
from emulator.model.segments import EdgeModel
from emulator.privacy.defence import DefenceSettings, add_noise, distance_correlation
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

    The middle runs in its own parameters' dtype (e.g. a bf16 emulator) through the same
    :class:`~emulator.model.runner.SegmentRunner` the cloud uses; hidden states and gradients are
    cast in and come back in fp32, as they would from the cloud.
    """

    def __init__(self, middle: nn.Module) -> None:
        self.middle = middle
        self.runner = SegmentRunner(middle)
        self.dtype = self.runner.dtype

    def forward(self, step, hidden, train, traffic):
        self.runner.release("local")  # a forward replaces one left without its backward
        out, _ = self.runner.forward("local", step, hidden, train)
        return out, 0.0  # the edge's own compute, not the cloud's

    def backward(self, step, grad, traffic):
        out, _ = self.runner.backward("local", step, grad)
        return out, 0.0


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


NOPEEK_MAX_ROWS = 1024  # positions entering the dCor penalty (its cost is quadratic in them)


def nopeek_penalty(model: EdgeModel, input_ids: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Distance correlation between the token embeddings and the bottom-cut states of a batch's
    positions, ``(batch, seq)`` ids and ``(batch, seq, hidden)`` states (NoPeek's penalty)."""
    with torch.no_grad():
        embeds = model.bottom.embed_tokens(input_ids).flatten(0, 1)
    states = lower.flatten(0, 1)
    if len(states) > NOPEEK_MAX_ROWS:
        keep = torch.linspace(0, len(states) - 1, NOPEEK_MAX_ROWS).long()
        embeds, states = embeds[keep], states[keep]
    return distance_correlation(embeds, states)


def transmitted(hidden: torch.Tensor, defence: DefenceSettings | None) -> torch.Tensor:
    """What crosses the wire at the bottom cut: the state, with the defence's noise if any."""
    return add_noise(hidden, defence.noise) if defence is not None else hidden


def split_step(model: EdgeModel, link: MiddleLink, step: int, input_ids: torch.Tensor, labels: torch.Tensor,
               traffic: Traffic, defence: DefenceSettings | None = None) -> StepOutput:
    """One training step's forward and backward (the caller steps the optimizer).

    Two round trips: hidden up / hidden down, then gradient up / gradient down (one round trip and no
    middle backward when the bottom blocks have nothing to train). With a defence the
    state sent up is noised (the noise is additive, so the returned gradient applies unchanged) and
    NoPeek's penalty joins the gradient of the edge's bottom blocks.
    """
    lower = model.bottom(input_ids)
    below = lower.requires_grad  # False when nothing below the top cut trains (offsite --tune lora-top)
    upper, compute_up = link.forward(step, transmitted(lower, defence).detach(), below, traffic)
    upper.requires_grad_(below)
    loss = completion_loss(model, upper, labels)
    loss.backward()
    if not below:  # no gradient to send down: the middle runs forward only
        return StepOutput(loss.item(), compute_up)
    assert upper.grad is not None
    grad_lower, compute_down = link.backward(step, upper.grad, traffic)
    if defence is not None and defence.nopeek > 0:
        penalty = defence.nopeek * nopeek_penalty(model, input_ids, lower)
        torch.autograd.backward([lower, penalty], [grad_lower, torch.ones_like(penalty)])
    else:
        lower.backward(grad_lower)
    return StepOutput(loss.item(), compute_up + compute_down)


@torch.no_grad()
def split_logits(model: EdgeModel, link: MiddleLink, input_ids: torch.Tensor, traffic: Traffic,
                 defence: DefenceSettings | None = None) -> torch.Tensor:
    """Full ``(batch, seq, vocab)`` logits by split inference."""
    upper, _ = link.forward(0, transmitted(model.bottom(input_ids), defence), False, traffic)
    return model.top(upper)


@torch.no_grad()
def score_examples(model: EdgeModel, link: MiddleLink, examples: list[EvalExample], pad_id: int,
                   traffic: Traffic, defence: DefenceSettings | None = None) -> list[int]:
    """Predicted choice per example by split inference (see :mod:`emulator.data.scoring`); a
    defence's noise applies to inference too, since the state crosses the wire then as well."""

    def features(ids: torch.Tensor) -> torch.Tensor:
        upper, _ = link.forward(0, transmitted(model.bottom(ids), defence), False, traffic)
        return model.top.features(upper)

    return predict(examples, features, model.top.lm_head, pad_id)
