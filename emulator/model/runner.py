"""The one frozen-segment runner, shared by the cloud's backbone and the edge's in-process middles.

A :class:`SegmentRunner` runs a frozen block stack forward and, for a training forward, keeps the
autograd graph inside itself under a handle ``(session, step)``; the backward is asked for by that
handle, never by passing a live tensor. Hidden states and gradients cross it in fp32 whatever dtype
the segment runs in. Both calls return the compute seconds they took, excluding the time spent
waiting on remote LoRA sites (dlora), which the ``sites`` object reports as ``waited_s``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class RunnerError(ValueError):
    """A backward that does not match a kept forward (unknown handle, wrong gradient shape)."""


class SiteCalls(Protocol):
    """What a forward's remote LoRA sites need from the runner (see :mod:`emulator.adapters.remote_sites`)."""

    waited_s: float  # seconds spent waiting for the sites' answers so far

    def prepare(self, segment: nn.Module) -> None:
        """Makes ``segment`` able to route its sites (idempotent; called before every forward)."""
        ...

    def routed(self) -> AbstractContextManager[None]:
        """Within this context the segment's sites call out; outside it they add nothing."""
        ...


@dataclass
class _Pending:
    inputs: torch.Tensor  # (batch, seq, hidden), a leaf in the segment's dtype
    outputs: torch.Tensor  # (batch, seq, hidden)
    sites: SiteCalls | None


class SegmentRunner:
    """Runs a frozen ``segment`` in ``dtype`` (``None``: the segment's own), graphs kept by handle.

    The segment is converted in place when ``dtype`` differs (callers hand over a copy they own).
    Thread-safe: sessions may run forwards concurrently; one handle is used by one thread at a time.
    """

    def __init__(self, segment: nn.Module, dtype: torch.dtype | None = None) -> None:
        current = next(segment.parameters()).dtype
        self.dtype = dtype or current
        if any(p.dtype != self.dtype for p in segment.parameters()):
            segment = segment.to(self.dtype)
        self.segment = segment.eval().requires_grad_(False)
        self._pending: dict[tuple[Hashable, int], _Pending] = {}
        self._lock = threading.Lock()

    def forward(self, session: Hashable, step: int, hidden: torch.Tensor, train: bool,
                sites: SiteCalls | None = None) -> tuple[torch.Tensor, float]:
        """``hidden`` ``(batch, seq, hidden)`` -> ``(output in fp32, compute seconds)``.

        A training forward keeps its graph under ``(session, step)`` until :meth:`backward` or
        :meth:`release`; ``sites`` routes the active remote LoRA sites of this forward.
        """
        start, waited = time.perf_counter(), sites.waited_s if sites is not None else 0.0
        if sites is not None:
            sites.prepare(self.segment)
        routed = sites.routed() if sites is not None else nullcontext()
        if not train:
            with torch.no_grad(), routed:
                out = self.segment(hidden.to(self.dtype))
            return out.float(), self._elapsed(start, sites, waited)
        inputs = hidden.detach().to(self.dtype).requires_grad_(True)
        with torch.enable_grad(), routed:
            out = self.segment(inputs)
        with self._lock:
            self._pending[(session, step)] = _Pending(inputs, out, sites)
        return out.detach().float(), self._elapsed(start, sites, waited)

    def backward(self, session: Hashable, step: int, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient at the output of the kept forward ``(session, step)`` -> gradient at its input.

        Raises:
            RunnerError: no training forward is kept under that handle, or ``grad`` has another shape.
        """
        with self._lock:
            pending = self._pending.get((session, step))
            if pending is None:
                raise RunnerError(f"backward for step {step} without its training forward")
            if tuple(grad.shape) != tuple(pending.outputs.shape):
                raise RunnerError(f"step {step}: gradient shape {tuple(grad.shape)} does not match the "
                                  f"activation {tuple(pending.outputs.shape)}")
            del self._pending[(session, step)]
        sites = pending.sites
        start, waited = time.perf_counter(), sites.waited_s if sites is not None else 0.0
        # backward(inputs=...), not autograd.grad: FlopCounterMode's module tracking (edge FLOP counts)
        # only supports backward(); the frozen segment accumulates nothing but the input's gradient.
        pending.outputs.backward(grad.to(pending.outputs.dtype), inputs=[pending.inputs])
        assert pending.inputs.grad is not None
        return pending.inputs.grad.float(), self._elapsed(start, sites, waited)

    def release(self, session: Hashable) -> int:
        """Frees every graph kept for ``session``; returns how many there were."""
        with self._lock:
            keys = [k for k in self._pending if k[0] == session]
            for key in keys:
                del self._pending[key]
        return len(keys)

    def pending(self, session: Hashable) -> list[int]:
        """Steps of ``session`` whose graphs are kept."""
        with self._lock:
            return sorted(step for s, step in self._pending if s == session)

    @staticmethod
    def _elapsed(start: float, sites: SiteCalls | None, waited_before: float) -> float:
        waited = (sites.waited_s - waited_before) if sites is not None else 0.0
        return max(time.perf_counter() - start - waited, 0.0)
