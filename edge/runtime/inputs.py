"""Prediction input rows, tokenized with the ``tokenizers`` library the way training tokenizes them.

A row is ``{"prompt": str}`` (predict a completion greedily) or ``{"prompt": str, "choices": [str, ...]}``
(predict a label), with an optional ``"answer": int``. Tokenization, left truncation and the scoring
sequences follow :func:`emulator.data.datasets.load_eval` exactly; a test compares both on the same rows,
because this module must not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad prediction input; one line naming the file, the line and the problem."""


@dataclass(frozen=True)
class Row:
    """One input row, tokenized.

    Attributes:
        sequences: token ids to run (choices: one shared prompt or one sequence per choice; completion: the prompt).
        targets: per choice, ``(sequence index, position, token id)`` whose log-probabilities sum to its score.
        choices: the choice strings (empty: predict a completion).
        answer: the correct choice index, or ``None``.
    """

    index: int
    prompt: str
    sequences: list[list[int]]
    targets: list[list[tuple[int, int, int]]]
    choices: list[str]
    answer: int | None


def _fit(prompt: list[int], completion: list[int], seq_len: int, where: str) -> list[int]:
    if len(completion) > seq_len - 1:
        raise InputError(f"{where}: completion of {len(completion)} tokens is longer than the context "
                         f"(--seq-len {seq_len} leaves {seq_len - 1})")
    room = seq_len - len(completion)
    return prompt[-room:] if len(prompt) > room else prompt


def scoring(prompt: list[int], choices: list[list[int]]) -> tuple[list[list[int]], list[list[tuple[int, int, int]]]]:
    """Single-token choices share one pass over the prompt; longer ones get a sequence each."""
    last = len(prompt) - 1
    if all(len(c) == 1 for c in choices):
        return [prompt], [[(0, last, c[0])] for c in choices]
    sequences = [prompt + c for c in choices]
    return sequences, [[(i, last + j, tok) for j, tok in enumerate(c)] for i, c in enumerate(choices)]


def _check(row: Any, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise InputError(f"{where}: expected a JSON object with a string 'prompt'")
    choices = row.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise InputError(f"{where}: field 'choices' must be a list of at least 2 strings")
    answer = row.get("answer")
    if answer is not None and (choices is None or not isinstance(answer, int) or isinstance(answer, bool)
                               or not 0 <= answer < len(choices)):
        raise InputError(f"{where}: answer {answer!r} must index 'choices'")


def load_rows(path: Path, tokenizer, seq_len: int, max_new_tokens: int = 0) -> list[Row]:
    """Reads, checks and tokenizes a prediction JSONL (``tokenizer``: a ``tokenizers.Tokenizer``)."""
    if not path.is_file():
        raise InputError(f"--data {path}: file not found")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            _check(row, where)
            rows.append(_tokenize(len(rows), row, tokenizer, seq_len, max_new_tokens, where))
    if not rows:
        raise InputError(f"--data {path}: file is empty; expected one JSON object per line")
    return rows


def _tokenize(index: int, row: dict, tokenizer, seq_len: int, max_new_tokens: int, where: str) -> Row:
    prompt = tokenizer.encode(row["prompt"]).ids
    if "choices" not in row:
        return Row(index, row["prompt"], [prompt[-max(seq_len - max_new_tokens, 1):]], [], [], None)
    encoded = [tokenizer.encode(c, add_special_tokens=False).ids for c in row["choices"]]
    if any(not c for c in encoded):
        raise InputError(f"{where}: a choice is empty")
    sequences, targets = scoring(_fit(prompt, max(encoded, key=len), seq_len, where), encoded)
    return Row(index, row["prompt"], sequences, targets, list(row["choices"]), row.get("answer"))
