"""Membership probe on an uploaded adapter (offsite mode): can the owner tell training rows from
other rows by scoring them with and without the adapter?"""

from __future__ import annotations


def auc(positives: list[float], negatives: list[float]) -> float:
    """Area under the ROC curve of a score separating ``positives`` from ``negatives``
    (Mann-Whitney U / (n_pos * n_neg); ties count one half). 0.5 is chance."""
    if not positives or not negatives:
        raise ValueError("auc needs at least one positive and one negative score")
    wins = 0.0
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    below, i = 0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        pos = sum(label for _, label in ranked[i:j])
        neg = (j - i) - pos
        wins += pos * below + 0.5 * pos * neg
        below += neg
        i = j
    return wins / (len(positives) * len(negatives))


def membership_scores(base_losses: list[float], adapter_losses: list[float]) -> list[float]:
    """Per row: how much the adapter lowers the row's loss (a member's loss drops more)."""
    return [b - a for b, a in zip(base_losses, adapter_losses)]
