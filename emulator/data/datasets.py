"""edgetune's dataset formats: JSONL validation, tokenization, truncation and batching.

Training rows are ``{"prompt": str, "completion": str}`` (loss on the completion only) or
``{"text": str}`` (loss on every token). Evaluation rows are
``{"prompt": str, "choices": [str, ...], "answer": int}``. The edge reads its private data with
these functions (none of it ever leaves the device); the model owner reads its own evaluation data
with the same ones (``edgetune-cloud evaluate``), so both sides score a row the same way.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


class DataError(ValueError):
    """Bad data; ``str(err)`` is one line naming the file, the line and the problem."""


@dataclass(frozen=True)
class TrainExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken; labels[t] is the target *at* position t


@dataclass(frozen=True)
class EvalExample:
    """One multiple-choice row, tokenized: a scoring sequence per choice (or one shared one)."""

    sequences: list[list[int]]  # token ids to run
    targets: list[list[tuple[int, int, int]]]  # per choice: (sequence index, position, token id)
    answer: int


@dataclass(frozen=True)
class Dataset:
    path: Path
    examples: list
    truncated: int


def _rows(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    empty = True
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text; save the file as UTF-8 JSON Lines") from None
            if not line.strip():
                continue
            empty = False
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row
    if empty:
        raise DataError(f"{path}: file is empty; expected one JSON object per line")


def _string(path: Path, lineno: int, row: dict, key: str) -> str:
    if key not in row:
        raise DataError(f"{path}:{lineno}: missing field {key!r}")
    if not isinstance(row[key], str):
        raise DataError(f"{path}:{lineno}: field {key!r} must be a string")
    return row[key]


def _fit(prompt: list[int], completion: list[int], seq_len: int, where: str) -> tuple[list[int], bool]:
    """Truncates the prompt from the left so prompt + completion fits ``seq_len``."""
    if len(completion) > seq_len - 1:
        raise DataError(f"{where}: completion of {len(completion)} tokens is longer than the context "
                        f"(--seq-len {seq_len} leaves {seq_len - 1})")
    room = seq_len - len(completion)
    return (prompt[-room:], True) if len(prompt) > room else (prompt, False)


def parse_train(path: Path) -> list[tuple[int, dict]]:
    """Checks a training file's structure (no tokenizer needed); returns ``(line, row)`` pairs."""
    rows = []
    for lineno, row in _rows(path):
        if "prompt" in row or "text" not in row:
            _string(path, lineno, row, "prompt")
            _string(path, lineno, row, "completion")
        else:
            _string(path, lineno, row, "text")
        rows.append((lineno, row))
    return rows


def load_train(path: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Reads, checks and tokenizes a training file."""
    examples, truncated = [], 0
    for lineno, row in parse_train(path):
        where = f"{path}:{lineno}"
        if "prompt" not in row:
            ids = tokenizer(row["text"]).input_ids
            if len(ids) < 2:
                raise DataError(f"{where}: text has fewer than 2 tokens")
            truncated += len(ids) > seq_len
            ids = ids[:seq_len]
            examples.append(TrainExample(ids, list(ids)))
            continue
        prompt = tokenizer(row["prompt"]).input_ids
        completion = tokenizer(row["completion"], add_special_tokens=False).input_ids
        if not completion:
            raise DataError(f"{where}: completion is empty")
        prompt, cut = _fit(prompt, completion, seq_len, where)
        truncated += cut
        examples.append(TrainExample(prompt + completion, [IGNORE] * len(prompt) + completion))
    return Dataset(path, examples, truncated)


def parse_eval(path: Path) -> list[tuple[int, dict]]:
    """Checks an evaluation file's structure (no tokenizer needed); returns ``(line, row)`` pairs."""
    rows = []
    for lineno, row in _rows(path):
        where = f"{path}:{lineno}"
        _string(path, lineno, row, "prompt")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of at least 2 strings")
        answer = row.get("answer")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {answer!r} out of range 0..{len(choices) - 1}")
        rows.append((lineno, row))
    return rows


def load_eval(path: Path, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Dataset:
    """Reads, checks and tokenizes an evaluation file (lm-eval-harness style multiple choice)."""
    examples, truncated = [], 0
    for lineno, row in parse_eval(path):
        where = f"{path}:{lineno}"
        prompt = tokenizer(row["prompt"]).input_ids
        encoded = [tokenizer(c, add_special_tokens=False).input_ids for c in row["choices"]]
        if any(not c for c in encoded):
            raise DataError(f"{where}: a choice is empty")
        prompt, cut = _fit(prompt, max(encoded, key=len), seq_len, where)
        truncated += cut
        examples.append(_scoring(prompt, encoded, row["answer"]))
    return Dataset(path, examples, truncated)


def _scoring(prompt: list[int], choices: list[list[int]], answer: int) -> EvalExample:
    """Single-token choices share one pass over the prompt; longer ones get a sequence each."""
    last = len(prompt) - 1
    if all(len(c) == 1 for c in choices):
        return EvalExample([prompt], [[(0, last, c[0])] for c in choices], answer)
    sequences = [prompt + c for c in choices]
    targets = [[(i, last + j, tok) for j, tok in enumerate(c)] for i, c in enumerate(choices)]
    return EvalExample(sequences, targets, answer)


def pad_batch(sequences: list[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    """Right-pads id lists into a ``(batch, max_len)`` long tensor."""
    width = max(len(s) for s in sequences)
    value = pad_id if fill is None else fill
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def train_batches(data: Dataset, batch_size: int, pad_id: int, seed: int,
                  start_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches ``(input_ids, labels)``, each ``(batch, seq)``, reshuffled every epoch."""
    epoch = start_epoch
    while True:
        order = list(range(len(data.examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            rows = [data.examples[j] for j in order[i:i + batch_size]]
            yield pad_batch([r.input_ids for r in rows], pad_id), pad_batch([r.labels for r in rows], pad_id, IGNORE)
        epoch += 1
