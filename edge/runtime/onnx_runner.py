"""The exported edge segments on onnxruntime, and multiple-choice scoring and greedy completion in numpy.

Scoring is :mod:`emulator.data.scoring`'s: a choice's score is the sum of its tokens' log-probabilities,
the prediction the first choice with the highest score, and only the positions that predict a choice
token go through the output layer. No torch here: this module runs where torch is not installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.runtime.inputs import Row
from edge.runtime.manifest import BOTTOM, TOP

Middle = Callable[[np.ndarray], np.ndarray]  # hidden at the lower cut -> hidden at the upper cut, (batch, seq, hidden)


@dataclass
class EdgeClock:
    """Seconds and tokens of edge-side compute only (the middle's round trips are not counted)."""

    seconds: float = 0.0
    tokens: int = 0


@dataclass
class OnnxEdge:
    """The bottom and top graphs of an export directory, as onnxruntime sessions."""

    directory: Path
    threads: int = 0  # intra-op threads; 0: onnxruntime's default
    clock: EdgeClock = field(default_factory=EdgeClock)

    def __post_init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self._bottom = ort.InferenceSession(str(self.directory / BOTTOM), options, providers=providers)
        self._top = ort.InferenceSession(str(self.directory / TOP), options, providers=providers)

    def bottom(self, input_ids: np.ndarray) -> np.ndarray:
        """``(batch, seq)`` int64 ids -> ``(batch, seq, hidden)`` float32 states at the lower cut."""
        start = time.perf_counter()
        out = self._bottom.run(None, {"input_ids": input_ids.astype(np.int64)})[0]
        self.clock.seconds += time.perf_counter() - start
        self.clock.tokens += int(input_ids.size)
        return out

    def logits_at(self, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """States at the upper cut and ``(n, 2)`` ``(row, position)`` pairs -> ``(n, vocab)`` logits."""
        start = time.perf_counter()
        out = self._top.run(None, {"hidden": np.ascontiguousarray(hidden, dtype=np.float32),
                                   "positions": positions.astype(np.int64)})[0]
        self.clock.seconds += time.perf_counter() - start
        return out


def pad(sequences: list[list[int]], pad_id: int) -> np.ndarray:
    """Right-pads id lists into a ``(batch, max_len)`` int64 array."""
    width = max(len(s) for s in sequences)
    return np.array([s + [pad_id] * (width - len(s)) for s in sequences], dtype=np.int64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def length_batches(rows: list[Row], batch: int) -> Iterator[list[Row]]:
    """Rows of similar length together (as :func:`emulator.data.scoring.length_batches`)."""
    ordered = sorted(rows, key=lambda r: max(len(s) for s in r.sequences))
    for i in range(0, len(ordered), batch):
        yield ordered[i:i + batch]


def choose(edge: OnnxEdge, middle: Middle, rows: list[Row], pad_id: int) -> list[tuple[int, list[float]]]:
    """Predicted choice and every choice's summed log-probability, per row of one batch."""
    ids = pad([s for r in rows for s in r.sequences], pad_id)
    upper = middle(edge.bottom(ids))
    flat, base = [], 0
    for r in rows:
        flat += [(base + s, pos, tok) for choice in r.targets for (s, pos, tok) in choice]
        base += len(r.sequences)
    index = np.array(flat, dtype=np.int64)
    token_lp = log_softmax(edge.logits_at(upper, index[:, :2]))[np.arange(len(flat)), index[:, 2]]
    results, k = [], 0
    for r in rows:
        sums = []
        for choice in r.targets:
            sums.append(float(token_lp[k:k + len(choice)].sum()))
            k += len(choice)
        results.append((max(range(len(sums)), key=sums.__getitem__), sums))
    return results


def complete(edge: OnnxEdge, middle: Middle, rows: list[Row], pad_id: int, eos_id: int | None,
             max_new_tokens: int) -> list[list[int]]:
    """Greedy completions of a batch of prompts: each new token is one bottom/middle/top pass."""
    sequences = [list(r.sequences[0]) for r in rows]
    new: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not live:
            break
        ids = pad([sequences[i] for i in live], pad_id)
        positions = np.array([(j, len(sequences[i]) - 1) for j, i in enumerate(live)], dtype=np.int64)
        tokens = edge.logits_at(middle(edge.bottom(ids)), positions).argmax(axis=-1)
        for i, token in zip(live, tokens.tolist()):
            sequences[i].append(token)
            new[i].append(token)
        live = [i for i in live if new[i][-1] != eos_id]
    return [[t for t in n if t != eos_id] for n in new]
