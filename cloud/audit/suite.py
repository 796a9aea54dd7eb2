"""The owner's audit of one edge: every inversion attack on the same observed states, side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cloud.audit.inversion import (
    Identity,
    Inverter,
    Recovery,
    StatesFn,
    fit_inverters,
    owner_states,
    token_accuracy,
    top_candidates,
    white_box_search,
)
from cloud.audit.inversion import (
    score as score_rows,
)
from emulator.privacy.defence import DefenceSettings


@dataclass(frozen=True)
class AuditSettings:
    """Sizes of the audit (the attack budget).

    Attributes:
        top_k: A1 candidates A2 tries per position.
        a2_rows: rows A2 attacks (the most expensive attack; the first rows of the observed set).
        mlp_steps: optimiser steps of the neural inverter.
        mlp_width: its hidden width.
        seed: the owner's own noise draws.
    """

    top_k: int = 8
    a2_rows: int = 200
    mlp_steps: int = 300
    mlp_width: int = 1024
    seed: int = 1234


@torch.no_grad()
def head_decode(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """A0 LM-head decoding: argmax of the base head (final norm + LM head) applied to each state."""
    return torch.cat([head(states[i:i + chunk]).argmax(-1) for i in range(0, len(states), chunk)])


def audit(observed: list[torch.Tensor], truths: list[list[int]], states_fn: StatesFn, embeddings: torch.Tensor,
          head: Callable[[torch.Tensor], torch.Tensor], owner_ids: torch.Tensor, defence: DefenceSettings,
          settings: AuditSettings = AuditSettings(), spans: list[tuple[int, int]] | None = None) -> list[Recovery]:
    """Runs A0, A1 and A2 on what one edge sent.

    Args:
        observed: per row, the ``(len, hidden)`` states that crossed the wire.
        truths: per row, the token ids (used only to score the attacks).
        states_fn: the base edge blocks, ``(batch, seq)`` ids -> ``(batch, seq, hidden)``.
        embeddings: ``(vocab, dim)`` token embedding table.
        head: base final norm + LM head, ``(n, hidden)`` -> ``(n, vocab)``.
        owner_ids: ``(rows, seq)`` token ids of the owner's own text (never the edge's).
        defence: the defence the edge announced (replayed with the owner's own draws).
        spans: per row, the ``[start, end)`` positions that are scored (e.g. the private text without a
            prompt template the owner knows anyway); default: every position.

    Returns:
        One :class:`Recovery` per attack; A2 covers the first ``settings.a2_rows`` rows.
    """
    flat, embeddings = torch.cat(observed).detach(), embeddings.detach()
    lengths = [len(o) for o in observed]

    cut = spans or [(0, n) for n in lengths]

    def rows_of(tokens: torch.Tensor) -> list[list[int]]:
        return [t.tolist() for t in torch.split(tokens, lengths)]

    def score(name: str, guesses: list[list[int]], truth: list[list[int]]) -> Recovery:
        return score_rows(name, [g[a:b] for g, (a, b) in zip(guesses, cut)], [t[a:b] for t, (a, b) in zip(truth, cut)])

    n_fit = max(1, int(len(owner_ids) * 0.9))
    fit = owner_states(states_fn, owner_ids[:n_fit], defence, settings.seed)
    held = owner_states(states_fn, owner_ids[n_fit:], defence, settings.seed + 1)
    inverters: list[Inverter] = [Identity(), *fit_inverters(fit, embeddings, settings.mlp_steps, settings.mlp_width)]
    results = [score("A0 LM head", rows_of(head_decode(head, flat)), truths)]
    owner_acc: dict[str, float] = {}
    for inv in inverters:
        owner_acc[inv.name] = token_accuracy(inv, held, embeddings)
        result = score(inv.name, rows_of(top_candidates(inv.predict(flat), embeddings, 1)[:, 0]), truths)
        result.extra["owner_heldout_recovery"] = owner_acc[inv.name]
        results.append(result)
    # A2 draws its candidates from the inverter that did best on the owner's own held-out text
    best = max(inverters[1:], key=lambda inv: owner_acc[inv.name])
    n = min(settings.a2_rows, len(observed))
    cands = [top_candidates(best.predict(o), embeddings, settings.top_k) for o in observed[:n]]
    guesses = white_box_search(observed[:n], cands, states_fn, pad_id=0)
    a2 = score("A2 white-box search", guesses, truths[:n])
    a2.extra.update({"candidates_from": best.name, "top_k": settings.top_k})
    results.append(a2)
    return results


def strongest(results: list[Recovery]) -> Recovery:
    """The attack with the highest token recovery."""
    return max(results, key=lambda r: r.token_recovery)
