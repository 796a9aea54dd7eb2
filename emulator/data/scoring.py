"""Multiple-choice scoring of a causal LM, lm-eval-harness style, shared by edge and cloud evaluation.

A row's prediction is the choice whose tokens have the highest summed log-likelihood. Only the
positions that predict a choice token go through the output layer, so a 49,152-word head costs a
few rows of logits per example instead of ``(batch, seq, vocab)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from emulator.data.datasets import EvalExample, pad_batch

Features = Callable[[torch.Tensor], torch.Tensor]  # (batch, seq) ids -> (batch, seq, hidden), final norm applied


@torch.no_grad()
def choice_predictions(examples: list[EvalExample], features: torch.Tensor, lm_head: nn.Module) -> list[int]:
    """Predicted choice per example.

    Args:
        examples: the rows, in the order their sequences were stacked into the batch.
        features: ``(sequences, seq, hidden)`` final hidden states of every example's sequences.
        lm_head: the output layer.
    """
    predictions, base = [], 0
    for ex in examples:
        rows = [(base + s, pos, tok) for choice in ex.targets for (s, pos, tok) in choice]
        index = torch.tensor([(r[0], r[1]) for r in rows])
        logprobs = torch.log_softmax(lm_head(features[index[:, 0], index[:, 1]]).float(), dim=-1)
        token_lp = logprobs[torch.arange(len(rows)), torch.tensor([r[2] for r in rows])]
        sums, k = [], 0
        for choice in ex.targets:
            sums.append(token_lp[k:k + len(choice)].sum().item())
            k += len(choice)
        predictions.append(max(range(len(sums)), key=sums.__getitem__))
        base += len(ex.sequences)
    return predictions


def length_batches(examples: list[EvalExample], batch: int) -> Iterator[list[EvalExample]]:
    """Rows of similar length together, so little compute goes to padding (accuracy is order-free)."""
    ordered = sorted(examples, key=lambda ex: max(len(s) for s in ex.sequences))
    for i in range(0, len(ordered), batch):
        yield ordered[i:i + batch]


@torch.no_grad()
def predict(examples: list[EvalExample], features: Features, lm_head: nn.Module, pad_id: int) -> list[int]:
    """Predictions for one batch of rows, ``features`` computing the final hidden states of padded ids."""
    ids = pad_batch([s for ex in examples for s in ex.sequences], pad_id)
    return choice_predictions(examples, features(ids), lm_head)


def accuracy(examples: list[EvalExample], predict_batch: Callable[[list[EvalExample]], list[int]], batch: int,
             desc: str = "eval", leave: bool = False) -> float:
    """Share of rows whose predicted choice is the answer, with a progress bar; ``predict_batch``
    predicts one batch of rows (see :func:`predict`)."""
    correct = 0
    with tqdm(total=len(examples), desc=desc, unit="row", leave=leave) as bar:
        for chunk in length_batches(examples, batch):
            correct += sum(p == ex.answer for p, ex in zip(predict_batch(chunk), chunk))
            bar.update(len(chunk))
    return correct / len(examples)
