"""Inverting the bottom-cut hidden state back to the edge's tokens, as the model owner would.

The attacker knows the algorithm, the public base weights and the defence the edge announces, but
not the edge's data, its LoRA or its noise draws. Three attack families:

* **A0** — no training: nearest token embedding (cosine) and LM-head decoding of the state.
* **A1** — inverters fitted on the owner's own text (e.g. :mod:`emulator.offsite.corpus`) passed
  through the base edge blocks *with the announced defence* (same noise scale, the owner's draws):
  a closed-form ridge map to the embedding space, and a small residual MLP on top of it. Both
  decode by nearest embedding.
* **A2** — white-box search: position by position, given the recovered prefix, each of A1's top-k
  candidates is run through the base edge blocks (causal, so the prefix matters) and the one whose
  state is nearest the observed one is kept.

Scores: exact token recovery, whole-row exact match and ROUGE-L F1 over token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from emulator.privacy.defence import DefenceSettings, add_noise

StatesFn = Callable[[torch.Tensor], torch.Tensor]  # (batch, seq) ids -> (batch, seq, hidden), base blocks


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-position RMS normalisation: removes the huge norm spread between positions."""
    return x / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)


def _features(states: torch.Tensor) -> torch.Tensor:
    """``(n, hidden)`` -> ``(n, hidden + 1)``: normalised state and a bias column."""
    return torch.cat([_normalise(states.float()), torch.ones(len(states), 1)], dim=-1)


def top_candidates(predicted: torch.Tensor, embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices ``(n, k)`` of the ``k`` embeddings nearest (cosine) each predicted vector ``(n, dim)``."""
    table = F.normalize(embeddings.float(), dim=-1)
    out = []
    for i in range(0, len(predicted), chunk):
        sims = F.normalize(predicted[i:i + chunk].float(), dim=-1) @ table.T
        out.append(sims.topk(k, dim=-1).indices)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


class Inverter:
    """A map from transmitted states ``(n, hidden)`` to the embedding space ``(n, dim)``."""

    name = "inverter"

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Identity(Inverter):
    """A0: the state itself is compared with the embeddings (no training)."""

    name = "A0 nearest embedding"

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return states.float()


@dataclass
class RidgeInverter(Inverter):
    """A1 linear: closed-form ridge regression from normalised states to token embeddings."""

    weight: torch.Tensor  # (hidden + 1, dim)
    name: str = "A1 ridge"

    @classmethod
    def fit(cls, states: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2) -> RidgeInverter:
        x = _features(states).double()
        gram = x.T @ x
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        return cls(torch.linalg.solve(gram, x.T @ targets.double()).float())

    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return _features(states) @ self.weight


@dataclass
class MlpInverter(Inverter):
    """A1 neural: the ridge map plus a residual two-layer MLP, trained with a cosine loss to the
    token's embedding (no softmax over the whole vocabulary, so it fits in seconds on a CPU)."""

    base: RidgeInverter
    mlp: nn.Module
    name: str = "A1 MLP"

    @classmethod
    def fit(cls, base: RidgeInverter, states: torch.Tensor, targets: torch.Tensor, steps: int = 300,
            width: int = 1024, batch: int = 1024, seed: int = 0) -> MlpInverter:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        dim_in = states.shape[-1] + 1
        out = nn.Linear(width, targets.shape[-1])
        nn.init.zeros_(out.weight)  # starts as the ridge map exactly
        nn.init.zeros_(out.bias)
        mlp = nn.Sequential(nn.Linear(dim_in, width), nn.GELU(), out)
        feats, start = _features(states), base.predict(states)
        goal = F.normalize(targets.float(), dim=-1)
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(0, len(feats), (min(batch, len(feats)),), generator=gen)
            pred = start[idx] + mlp(feats[idx])
            loss = 1 - F.cosine_similarity(pred, goal[idx], dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return cls(base, mlp.eval())

    @torch.no_grad()
    def predict(self, states: torch.Tensor) -> torch.Tensor:
        return self.base.predict(states) + self.mlp(_features(states))


@dataclass
class OwnerData:
    """States the owner generates itself from its own token ids, with the announced defence."""

    ids: torch.Tensor  # (rows, seq)
    states: torch.Tensor  # (rows * seq, hidden)

    @property
    def targets(self) -> torch.Tensor:
        return self.ids.flatten()


@torch.no_grad()
def owner_states(states_fn: StatesFn, ids: torch.Tensor, defence: DefenceSettings, seed: int,
                 batch: int = 16) -> OwnerData:
    """Runs the owner's ``(rows, seq)`` ids through the base edge blocks and the announced noise
    (drawn from the owner's own generator, never the edge's)."""
    gen = torch.Generator().manual_seed(seed)
    out = [add_noise(states_fn(ids[i:i + batch]), defence.noise, gen) for i in range(0, len(ids), batch)]
    return OwnerData(ids, torch.cat(out).flatten(0, 1))


def fit_inverters(train: OwnerData, embeddings: torch.Tensor, mlp_steps: int = 300,
                  mlp_width: int = 1024) -> list[Inverter]:
    """A1's two inverters fitted on the owner's states."""
    targets = embeddings.detach()[train.targets].float()
    ridge = RidgeInverter.fit(train.states, targets)
    return [ridge, MlpInverter.fit(ridge, train.states, targets, steps=mlp_steps, width=mlp_width)]


def token_accuracy(inverter: Inverter, data: OwnerData, embeddings: torch.Tensor) -> float:
    """Share of the owner's own held-out tokens an inverter recovers (its model selection, no edge data)."""
    guess = top_candidates(inverter.predict(data.states), embeddings, 1)[:, 0]
    return (guess == data.targets).float().mean().item()


@torch.no_grad()
def white_box_search(observed: list[torch.Tensor], candidates: list[torch.Tensor], states_fn: StatesFn,
                     pad_id: int, row_batch: int = 32) -> list[list[int]]:
    """A2: recovers each row token by token; rows advance together, position by position.

    Args:
        observed: per row, the ``(len, hidden)`` states seen on the wire.
        candidates: per row, ``(len, k)`` candidate token ids (A1's top-k).
        states_fn: the base edge blocks, ``(batch, seq)`` ids -> ``(batch, seq, hidden)``.
    """
    recovered: list[list[int]] = [[] for _ in observed]
    for start in range(0, len(observed), row_batch):
        rows = list(range(start, min(start + row_batch, len(observed))))
        for t in range(max(len(observed[r]) for r in rows)):
            live = [r for r in rows if len(observed[r]) > t]
            k = candidates[live[0]].shape[1]
            seqs = torch.tensor([recovered[r] + [int(c)] for r in live for c in candidates[r][t]], dtype=torch.long)
            states = states_fn(seqs)[:, t].float().view(len(live), k, -1)
            target = torch.stack([observed[r][t].float() for r in live])[:, None]
            best = (_normalise(states) - _normalise(target)).pow(2).sum(-1).argmin(dim=1)
            for r, b in zip(live, best.tolist()):
                recovered[r].append(int(candidates[r][t, b]))
    del pad_id  # rows are run unpadded, one length per step: no padding to mask
    return recovered


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(guess: list[int], truth: list[int]) -> float:
    """ROUGE-L F1 of two token sequences."""
    if not guess or not truth:
        return 0.0
    lcs = lcs_length(guess, truth)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(guess), lcs / len(truth)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Recovery:
    """How much of the edge's rows an attack recovered."""

    attack: str
    token_recovery: float
    row_exact: float
    rouge_l: float
    rows: int
    tokens: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"attack": self.attack, "token_recovery": self.token_recovery, "row_exact": self.row_exact,
                "rouge_l": self.rouge_l, "rows": self.rows, "tokens": self.tokens, **self.extra}


def score(attack: str, guesses: list[list[int]], truths: list[list[int]]) -> Recovery:
    """Token recovery (position-aligned), whole-row exact match and mean ROUGE-L F1."""
    hits = sum(sum(g == t for g, t in zip(gs, ts)) for gs, ts in zip(guesses, truths))
    tokens = sum(len(t) for t in truths)
    exact = sum(list(g) == list(t) for g, t in zip(guesses, truths))
    rouge = sum(rouge_l(list(g), list(t)) for g, t in zip(guesses, truths))
    n = max(len(truths), 1)
    return Recovery(attack, hits / max(tokens, 1), exact / n, rouge / n, len(truths), tokens)
