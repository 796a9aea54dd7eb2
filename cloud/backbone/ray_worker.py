"""One Ray worker of the frozen middle: a threaded actor that loads the model itself and keeps graphs.

The coordinator (:mod:`cloud.backbone.ray_runner`) places sessions on workers; a worker holds the
graphs of its sessions' training forwards until their backwards (affinity), so only hidden states
and gradients cross Ray, never weights or graphs. Each call returns either the step's result
(:class:`~cloud.backbone.conversation.Finished`) or, for a dlora step, a
:class:`~cloud.backbone.conversation.Callout`: the coordinator asks the edge and hands the answer back
with :meth:`MiddleWorker.answer`. The step waits in a :class:`~cloud.backbone.conversation.Conversation`
thread of this worker meanwhile, exactly as it would in the coordinator's own process.

This module imports no Ray: the class is made an actor by ``ray.remote`` in the runner, so that
``serve`` without ``--backbone ray`` never loads it.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from pathlib import Path

import torch
from transformers import PreTrainedModel

from cloud.backbone.batching import BatchingRunner
from cloud.backbone.conversation import Answer, Callout, CalloutFn, Conversation, Finished
from cloud.backbone.cpu import prepare_compute_process
from emulator.adapters.remote_sites import RemoteSiteCalls, SiteGroup
from emulator.model.loading import compute_dtype, load_causal_lm, resolve_model
from emulator.model.segments import extract_middle, plan_for
from protocol.types import Phase

SitesSpec = tuple[list[SiteGroup], list[int]]  # a dlora step's site groups and active site indices
Reply = tuple[str, Callout | Finished]  # (the worker's incarnation, what the step needs next)


class GraphLost(RuntimeError):
    """A backward reached a restarted worker: the forward's graph died with the old process."""


class _CalloutExchange:
    """The worker side of a dlora step's site exchange: each call becomes a callout to the coordinator."""

    def __init__(self, callout: CalloutFn) -> None:
        self.callout = callout

    def forward(self, group: SiteGroup, x: torch.Tensor) -> torch.Tensor:
        return self.callout(Callout(Phase.SITE_INPUT, group.index, x)).tensor

    def backward(self, group: SiteGroup, grad: torch.Tensor) -> torch.Tensor:
        return self.callout(Callout(Phase.SITE_GRAD_OUTPUT, group.index, grad)).tensor


class MiddleWorker:
    """The frozen middle of one model, for every edge depth K asked for, in one process.

    Args:
        model_dir: the coordinator's model directory; used when it exists on this node.
        model_name: ``--model`` as given; resolved on this node otherwise (built-in name or path).
        dtype: ``float32`` or ``bfloat16``, the middle's compute dtype.
        threads: torch threads of this process (0: this node's cores divided by ``share``; Ray would
            otherwise leave one thread, measured 3x slower in fp32 than the coordinator's default).
        batch_window_s: cross-client batching window (``None``: off, one session per call).
        max_batch: most sessions in one batched call.
        share: how many workers share this node's cores.
    """

    def __init__(self, model_dir: str, model_name: str, dtype: str = "float32", threads: int = 0,
                 batch_window_s: float | None = None, max_batch: int = 8, share: int = 1) -> None:
        self.setup = prepare_compute_process(threads or max(1, (os.cpu_count() or 1) // share))
        path = Path(model_dir)
        self.model_dir = path if (path / "config.json").is_file() else resolve_model(model_name)
        self.model: PreTrainedModel | None = load_causal_lm(self.model_dir, dtype=torch.float32)
        self.dtype = compute_dtype(dtype)
        self.window_s, self.max_batch = batch_window_s, max_batch
        self._runners: dict[int, BatchingRunner] = {}
        self._conversations: dict[str, Conversation] = {}
        self._lock = threading.Lock()
        self.incarnation = uuid.uuid4().hex  # a process Ray restarts under the same handle gets a new one

    def info(self) -> dict[str, object]:
        """Who this worker is: pid, host, model directory and the process set-up."""
        return {"pid": os.getpid(), "host": socket.gethostname(), "model_dir": str(self.model_dir),
                "incarnation": self.incarnation, **self.setup}

    def forward(self, session: str, edge_layers: int, step: int, hidden: torch.Tensor, train: bool,
                sites: SitesSpec | None = None) -> Reply:
        """A forward of ``(session, step)``; its result, or a dlora site callout to answer first."""
        runner = self._runner(edge_layers)

        def job(callout: CalloutFn) -> tuple[Phase, str, torch.Tensor, float]:
            calls = None if sites is None else RemoteSiteCalls(sites[0], sites[1], _CalloutExchange(callout))
            out, seconds = runner.forward(session, step, hidden, train, calls)
            return Phase.ACTIVATION, "hidden_up", out, seconds

        return self.incarnation, self._conversation(session).start(job)

    def backward(self, session: str, edge_layers: int, step: int, grad: torch.Tensor, incarnation: str) -> Reply:
        """The backward of a kept forward; its input gradient, or a dlora site callout to answer first.

        Raises:
            GraphLost: the forward ran in an earlier process of this worker (``incarnation``).
        """
        if incarnation != self.incarnation:
            raise GraphLost(f"the worker restarted since step {step}'s forward; its graph is gone")
        runner = self._runner(edge_layers)

        def job(callout: CalloutFn) -> tuple[Phase, str, torch.Tensor, float]:
            out, seconds = runner.backward(session, step, grad)
            return Phase.GRADIENT, "grad_down", out, seconds

        return self.incarnation, self._conversation(session).start(job)

    def answer(self, session: str, answer: Answer) -> Reply:
        """The edge's answer to the last callout of ``session``; the step goes on."""
        return self.incarnation, self._conversation(session).answer(answer)

    def abort(self, session: str) -> None:
        """Unblocks a step of ``session`` that waits for an answer that will not come."""
        with self._lock:
            conversation = self._conversations.pop(session, None)
        if conversation is not None:
            conversation.close()

    def release(self, session: str) -> int:
        """Frees every graph kept for ``session`` on this worker; returns how many."""
        self.abort(session)
        with self._lock:
            runners = list(self._runners.values())
        return sum(r.release(session) for r in runners)

    def stats(self) -> dict[str, object]:
        """Compute seconds, queue wait and batch sizes, per edge depth K."""
        with self._lock:
            return {f"K={k}": r.stats.as_dict() for k, r in self._runners.items()}

    def _conversation(self, session: str) -> Conversation:
        with self._lock:
            return self._conversations.setdefault(session, Conversation())

    def _runner(self, edge_layers: int) -> BatchingRunner:
        with self._lock:
            if edge_layers not in self._runners:
                # The full model is dropped once a middle is cut from it (the worker keeps only what it
                # runs: on a 23 GB machine shared with other jobs the kernel's OOM killer took workers
                # holding both); a session with another K loads it again.
                model = self.model or load_causal_lm(self.model_dir, dtype=torch.float32)
                self.model = None
                middle = extract_middle(model, plan_for(model.config, edge_layers))
                del model
                window, size = (self.window_s, self.max_batch) if self.window_s is not None else (0.0, 1)
                self._runners[edge_layers] = BatchingRunner(middle, self.dtype, window, size)
            return self._runners[edge_layers]
