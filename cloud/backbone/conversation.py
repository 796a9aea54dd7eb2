"""A step's compute in a worker thread, so that it can ask the edge for tensors mid-forward.

gRPC hands a stream handler an iterator of edge messages and takes a generator of replies; a torch
forward cannot ``yield`` from inside a block. So each step runs as a *job* on a worker thread, and
the job's :meth:`Conversation.callout` hands a request to the stream handler, which sends it and
feeds the edge's answer back. Exactly one side acts at a time: the handler waits while the job
computes, the job waits while the edge answers. The job reports its compute seconds (the backbone
runner's, which exclude those waits).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cloud.errors import FailedPrecondition
from protocol.types import Phase


@dataclass(frozen=True)
class Callout:
    """The job asks the edge: send ``tensor`` in ``phase`` for ``site_group`` and wait for the answer."""

    phase: Phase
    site_group: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Answer:
    """The edge's answer to a :class:`Callout`."""

    phase: Phase
    site_group: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Finished:
    """The job's result: the step's reply to the edge and the cloud's compute seconds."""

    phase: Phase
    name: str
    tensor: torch.Tensor
    compute_s: float


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class StreamClosed(Exception):
    """The stream ended while a job waited for the edge; the job unwinds."""


CalloutFn = Callable[[Callout], Answer]
Job = Callable[[CalloutFn], tuple[Phase, str, torch.Tensor, float]]
_CLOSED = object()


class Conversation:
    """Runs one job at a time for one training stream."""

    def __init__(self) -> None:
        self._out: queue.Queue = queue.Queue()
        self._in: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """A job is running or waiting for the edge."""
        return self._thread is not None

    def start(self, job: Job) -> Callout | Finished:
        """Starts ``job`` and returns its first callout or its result.

        Raises:
            FailedPrecondition: a job of this stream still waits for the edge's answer.
        """
        if self.busy:
            raise FailedPrecondition("a new step arrived while the cloud waits for the edge's site answer")
        self._thread = threading.Thread(target=self._run, args=(job,), name="edgetune-step", daemon=True)
        self._thread.start()
        return self._next()

    def answer(self, answer: Answer) -> Callout | Finished:
        """Hands the edge's answer to the waiting job; returns its next callout or its result."""
        if not self.busy:
            raise FailedPrecondition(f"{answer.phase.name} arrived but the cloud asked the edge nothing")
        self._in.put(answer)
        return self._next()

    def callout(self, request: Callout) -> Answer:
        """Called by the job (worker thread): asks the edge and blocks until it answers."""
        self._out.put(request)
        answer = self._in.get()
        if answer is _CLOSED:
            raise StreamClosed("the training stream closed mid-step")
        return answer

    def close(self) -> None:
        """Unblocks and joins a job left waiting (the edge went away mid-step)."""
        if self._thread is not None:
            self._in.put(_CLOSED)
            self._thread.join(timeout=60)
            self._thread = None

    def _run(self, job: Job) -> None:
        try:
            self._out.put(Finished(*job(self.callout)))
        except BaseException as err:  # noqa: BLE001 - re-raised in the handler's thread
            self._out.put(_Failed(err))

    def _next(self) -> Callout | Finished:
        item = self._out.get()
        if isinstance(item, Callout):
            return item
        assert self._thread is not None
        self._thread.join()
        self._thread = None
        if isinstance(item, _Failed):
            raise item.error
        return item
