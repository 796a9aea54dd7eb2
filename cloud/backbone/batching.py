"""Cross-client batching of the frozen middle: concurrent sessions' forwards (and backwards) in one call.

A :class:`BatchingRunner` implements the backbone seam for one segment. Every call is queued to one
compute thread; that thread takes what arrived within ``window_s`` of the first request, and

* **forwards** of the same kind (training or evaluation) are right-padded to the longest sequence,
  concatenated along the batch, run once, and split back. The middle applies a plain causal mask, so
  padding *after* a sequence changes none of its outputs: the split-back rows equal a per-session call
  up to float rounding of the larger matrix products (measured below 1e-5 in fp32).
* **backwards** of sessions whose forwards shared one batched graph are run once, with each waiting
  session's gradient in its rows and zeros elsewhere. Rows are independent (no op mixes batch rows),
  so each session's input gradient is exact. A session whose backward has not arrived within the
  window is left for later: the graph is retained until every row has been asked for or released.

Forwards with remote LoRA sites (dlora) are not batched: their call-outs to the edge are per session.
They run in the caller's thread through a plain :class:`~emulator.model.runner.SegmentRunner` sharing
the segment, so a session waiting on its edge never holds up the queue.

Batching pays where one call of a larger batch is cheaper than several small ones (accelerators). On
CPUs whose per-session products are already large it measured about even (docs/scale-out.md), so it
is off by default.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from emulator.model.runner import RunnerError, SegmentRunner, SiteCalls


@dataclass
class BatchStats:
    """What the operator sees of one runner's compute thread."""

    calls: int = 0  # compute calls made (a batched call counts once)
    requests: int = 0  # seam calls served
    batch_sizes: dict[int, int] = field(default_factory=dict)  # sessions in a call -> how many calls
    queue_wait_s: float = 0.0  # summed over requests: arrival to the start of their compute
    max_queue_wait_s: float = 0.0
    compute_s: float = 0.0

    def waited(self, seconds: float) -> None:
        self.requests += 1
        self.queue_wait_s += seconds
        self.max_queue_wait_s = max(self.max_queue_wait_s, seconds)

    def called(self, sessions: int, seconds: float) -> None:
        self.calls += 1
        self.batch_sizes[sessions] = self.batch_sizes.get(sessions, 0) + 1
        self.compute_s += seconds

    def as_dict(self) -> dict[str, object]:
        return {"calls": self.calls, "requests": self.requests, "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "queue_wait_s": round(self.queue_wait_s, 4), "max_queue_wait_s": round(self.max_queue_wait_s, 4),
                "compute_s": round(self.compute_s, 4)}


@dataclass
class _Request:
    kind: str  # "forward" | "backward" | "release"
    session: Hashable
    step: int
    tensor: torch.Tensor
    train: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[torch.Tensor, float] | None = None
    error: BaseException | None = None


@dataclass
class _Graph:
    """One batched training forward: its leaf input, output and which rows belong to whom."""

    inputs: torch.Tensor  # (sum batch, max seq, hidden), a leaf in the segment's dtype
    outputs: torch.Tensor
    rows: dict[tuple[Hashable, int], tuple[slice, int]]  # (session, step) -> (batch rows, seq length)
    outstanding: set[tuple[Hashable, int]]


class BatchingRunner:
    """The seam's three calls for one frozen ``segment``, coalesced across sessions on one thread.

    Args:
        segment: the frozen middle (a copy the runner owns), converted to ``dtype`` if needed.
        dtype: the compute dtype (``None``: the segment's own); tensors cross in fp32.
        window_s: how long the compute thread waits after a request for others to join it.
        max_sessions: most sessions in one call.
    """

    def __init__(self, segment: nn.Module, dtype: torch.dtype | None = None, window_s: float = 0.01,
                 max_sessions: int = 16) -> None:
        self.plain = SegmentRunner(segment, dtype)  # dlora forwards, and the converted segment
        self.segment, self.dtype = self.plain.segment, self.plain.dtype
        self.window_s, self.max_sessions = window_s, max_sessions
        self.stats = BatchStats()
        self._graphs: dict[tuple[Hashable, int], _Graph] = {}
        self._sites_steps: set[tuple[Hashable, int]] = set()  # dlora graphs, kept by self.plain
        self._sites_lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="edgetune-batcher", daemon=True)
        self._thread.start()

    # --- the seam ------------------------------------------------------------------------------

    def forward(self, session: Hashable, step: int, hidden: torch.Tensor, train: bool,
                sites: SiteCalls | None = None) -> tuple[torch.Tensor, float]:
        """``hidden`` ``(batch, seq, hidden)`` -> ``(output in fp32, this session's compute seconds)``."""
        if sites is not None:  # dlora: per-session call-outs, in the caller's thread (no queue)
            result = self.plain.forward(session, step, hidden, train, sites)
            if train:
                with self._sites_lock:
                    self._sites_steps.add((session, step))
            return result
        return self._submit(_Request("forward", session, step, hidden, train))

    def backward(self, session: Hashable, step: int, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient at the output of the kept forward ``(session, step)`` -> gradient at its input.

        Raises:
            RunnerError: no training forward is kept under that handle, or ``grad`` has another shape.
        """
        with self._sites_lock:
            dlora = (session, step) in self._sites_steps
            self._sites_steps.discard((session, step))
        if dlora:
            return self.plain.backward(session, step, grad)
        return self._submit(_Request("backward", session, step, grad))

    def release(self, session: Hashable) -> int:
        """Frees the rows kept for ``session`` (a batched graph goes once no row is outstanding)."""
        return int(self._submit(_Request("release", session, 0, torch.empty(0)))[1])

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # --- the compute thread -------------------------------------------------------------------------

    def _submit(self, request: _Request) -> tuple[torch.Tensor, float]:
        self._queue.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.window_s
            while len(batch) < self.max_sessions:
                try:
                    item = self._queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        for r in batch:  # everything but batched calls, in arrival order
            if r.kind == "release":
                self._finish([r], self._release, r)
        backward = [r for r in batch if r.kind == "backward" and self._check_backward(r)]
        for group in ([r for r in batch if r.kind == "forward" and r.train],
                      [r for r in batch if r.kind == "forward" and not r.train]):
            if group:
                self._finish(group, self._forward, group)
        if backward:
            self._finish(backward, self._backward, backward)

    def _finish(self, group: list[_Request], fn, arg) -> None:
        start = time.perf_counter()
        for r in group:
            self.stats.waited(start - r.arrived)
        try:
            fn(arg)
        except BaseException as err:  # noqa: BLE001 - handed to each caller's thread
            for r in group:
                r.error = err
        if group[0].kind != "release":
            self.stats.called(len(group), time.perf_counter() - start)
        for r in group:
            r.done.set()

    def _check_backward(self, r: _Request) -> bool:
        key = (r.session, r.step)
        graph = self._graphs.get(key)
        if graph is None:
            r.error = RunnerError(f"backward for step {r.step} without its training forward")
        else:
            rows, length = graph.rows[key]
            want = (rows.stop - rows.start, length, graph.outputs.shape[-1])
            if tuple(r.tensor.shape) != want:
                r.error = RunnerError(f"step {r.step}: gradient shape {tuple(r.tensor.shape)} does not match "
                                      f"the activation {want}")
        if r.error is not None:
            r.done.set()
            return False
        return True

    def _release(self, r: _Request) -> None:
        released = self.plain.release(r.session)
        with self._sites_lock:
            self._sites_steps = {k for k in self._sites_steps if k[0] != r.session}
        for key in [k for k in self._graphs if k[0] == r.session]:
            self._graphs.pop(key).outstanding.discard(key)
            released += 1
        r.result = torch.empty(0), float(released)

    def _forward(self, group: list[_Request]) -> None:
        start = time.perf_counter()
        longest = max(r.tensor.shape[1] for r in group)
        padded = [nn.functional.pad(r.tensor, (0, 0, 0, longest - r.tensor.shape[1])) for r in group]
        x = torch.cat(padded).to(self.dtype)
        rows, at = {}, 0
        for r in group:
            rows[(r.session, r.step)] = (slice(at, at + r.tensor.shape[0]), r.tensor.shape[1])
            at += r.tensor.shape[0]
        if group[0].train:
            x.requires_grad_(True)
            with torch.enable_grad():
                out = self.segment(x)
            graph = _Graph(x, out, rows, set(rows))
            for key in rows:
                self._graphs[key] = graph
        else:
            with torch.no_grad():
                out = self.segment(x)
        self._split_back(group, out.detach().float(), rows, time.perf_counter() - start)

    def _backward(self, group: list[_Request]) -> None:
        start = time.perf_counter()
        by_graph: dict[int, list[_Request]] = {}
        for r in group:
            by_graph.setdefault(id(self._graphs[(r.session, r.step)]), []).append(r)
        for requests in by_graph.values():
            graph = self._graphs[(requests[0].session, requests[0].step)]
            grad = torch.zeros_like(graph.outputs)
            for r in requests:
                rows, length = graph.rows[(r.session, r.step)]
                grad[rows, :length] = r.tensor.to(grad.dtype)
                graph.outstanding.discard((r.session, r.step))
                del self._graphs[(r.session, r.step)]
            (grad_in,) = torch.autograd.grad(graph.outputs, graph.inputs, grad, retain_graph=bool(graph.outstanding))
            self._split_back(requests, grad_in.float(), graph.rows, time.perf_counter() - start)

    @staticmethod
    def _split_back(group: list[_Request], full: torch.Tensor,
                    rows: dict[tuple[Hashable, int], tuple[slice, int]], seconds: float) -> None:
        """Each request's rows and sequence prefix of ``full``, and its share of ``seconds`` by tokens."""
        tokens = {id(r): r.tensor.shape[0] * r.tensor.shape[1] for r in group}
        total = sum(tokens.values())
        for r in group:
            span, length = rows[(r.session, r.step)]
            r.result = full[span, :length].contiguous(), seconds * tokens[id(r)] / total
