"""Which middle blocks an emulator keeps, measured on text the cloud owns (never the edge's data).

Three constructions, each a pure function from the middle to a new emulator:

* ``uniform`` — evenly spaced blocks (:func:`emulator.offsite.compress.layer_drop`).
* ``importance`` (ScaleOT / GradOT style) — :func:`drop_one_importance` measures, for every middle
  block, how much the full model's LM loss on the corpus rises when that one block is skipped; the
  ``E`` most important are kept (:func:`top_positions`). With ``bridge_rank > 0`` every run of dropped
  blocks is replaced by a small trained bridge (:func:`bridged_emulator`), to be fitted by distillation.
* ``crash`` (CRaSh, EMNLP 2023) — :func:`cka_matrix` compares the blocks' output representations (linear
  CKA); :func:`contiguous_clusters` groups neighbouring blocks into ``E`` clusters; one block per cluster is
  kept (:func:`representatives`) and repeated as often as the cluster is deep (:func:`shared_emulator`),
  so the emulator has the middle's depth but only ``E`` blocks' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emulator.model.segments import BlockStack, EdgeModel, run_blocks
from emulator.offsite.compress import EmulatorError
from emulator.offsite.stack import EmulatorStack, with_order

SELECTIONS = ("uniform", "importance", "crash")
MAX_CKA_TOKENS = 512  # positions entering each CKA (its cost is linear in them; enough to rank neighbours)


@torch.no_grad()
def block_states(edge: EdgeModel, middle: BlockStack, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state entering each middle block, then the middle's output: ``n + 1`` tensors of
    ``(batch, seq, hidden)`` for ``(batch, seq)`` token ids."""
    states = [edge.bottom(input_ids)]
    for block in middle.layers.values():
        states.append(run_blocks([block], states[-1], middle.spec, middle.rotary))
    return states


@torch.no_grad()
def lm_loss(edge: EdgeModel, middle_out: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Next-token cross-entropy of the edge's top on the middle's output ``(batch, seq, hidden)``."""
    features = edge.top.features(middle_out)[:, :-1]
    assert edge.top.lm_head is not None
    logits = edge.top.lm_head(features).float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)))


@torch.no_grad()
def drop_one_importance(edge: EdgeModel, middle: BlockStack, input_ids: torch.Tensor) -> list[float]:
    """Per middle block (in order): LM loss with that block skipped minus the full model's LM loss.

    Skipping block ``i`` reuses the state entering it, so only the blocks after it are rerun.
    """
    states = block_states(edge, middle, input_ids)
    base = lm_loss(edge, states[-1], input_ids)
    blocks = list(middle.layers.values())
    return [lm_loss(edge, run_blocks(blocks[i + 1:], states[i], middle.spec, middle.rotary), input_ids) - base
            for i in range(len(blocks))]


def top_positions(scores: list[float], keep: int) -> list[int]:
    """Positions of the ``keep`` highest scores, in ascending position order."""
    if not 1 <= keep < len(scores):
        raise EmulatorError(f"--emulator-layers {keep}: an emulator must have 1..{len(scores) - 1} blocks, fewer "
                            f"than the {len(scores)} middle blocks it replaces")
    return sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


def bridged_order(indices: list[int], kept: list[int]) -> list[str]:
    """Run order of the kept blocks (full-model ``indices`` of the middle, ``kept`` a subset) with a bridge
    ``"b<i>"`` in place of every maximal run of dropped blocks, ``i`` the run's first dropped index."""
    order: list[str] = []
    for pos, index in enumerate(indices):
        if index in kept:
            order.append(str(index))
        elif pos == 0 or indices[pos - 1] in kept:
            order.append(f"b{index}")
    return order


def bridged_emulator(middle: BlockStack, positions: list[int], hidden: int, bridge_rank: int) -> BlockStack:
    """A new emulator of the middle's blocks at ``positions``; with ``bridge_rank > 0``, bridges (identity
    at start) stand in for each dropped run. ``bridge_rank == 0``: the kept blocks alone."""
    indices = middle.indices
    kept = BlockStack({indices[p]: middle.layers[str(indices[p])] for p in positions}, middle.spec, middle.rotary)
    if bridge_rank == 0:
        return kept
    return with_order(kept, bridged_order(indices, kept.indices), hidden, bridge_rank)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(tokens, features)`` representations: 1 for identical up to rotation and scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()).clamp_min(1e-30))


@torch.no_grad()
def cka_matrix(edge: EdgeModel, middle: BlockStack, input_ids: torch.Tensor) -> list[list[float]]:
    """``(n, n)`` linear CKA between the middle blocks' outputs on ``(batch, seq)`` token ids."""
    outputs = [s.flatten(0, 1) for s in block_states(edge, middle, input_ids)[1:]]
    if len(outputs[0]) > MAX_CKA_TOKENS:
        pick = torch.linspace(0, len(outputs[0]) - 1, MAX_CKA_TOKENS).long()
        outputs = [o[pick] for o in outputs]
    n = len(outputs)
    sim = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            sim[i][j] = sim[j][i] = linear_cka(outputs[i], outputs[j])
    return sim


def contiguous_clusters(sim: list[list[float]], count: int) -> list[list[int]]:
    """Groups positions ``0..n-1`` into ``count`` runs of neighbours: starting from singletons, merges the
    adjacent pair of runs with the highest mean pairwise similarity until ``count`` remain."""
    n = len(sim)
    if not 1 <= count < n:
        raise EmulatorError(f"--emulator-layers {count}: CRaSh needs 1..{n - 1} clusters of the {n} middle blocks")
    clusters = [[i] for i in range(n)]
    while len(clusters) > count:
        def linkage(k: int) -> float:
            a, b = clusters[k], clusters[k + 1]
            return sum(sim[i][j] for i in a for j in b) / (len(a) * len(b))
        best = max(range(len(clusters) - 1), key=linkage)
        clusters[best:best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def representatives(sim: list[list[float]], clusters: list[list[int]]) -> list[int]:
    """Per cluster, the member most similar on average to the others (its medoid; ties: the earliest)."""
    return [max(c, key=lambda i: (sum(sim[i][j] for j in c), -i)) for c in clusters]


def shared_emulator(middle: BlockStack, clusters: list[list[int]], reps: list[int]) -> EmulatorStack:
    """A new emulator holding one block per cluster (``reps``, positions in the middle), each run
    ``len(cluster)`` times in a row: the middle's depth with ``len(clusters)`` blocks' weights."""
    indices = middle.indices
    blocks = {indices[r]: middle.layers[str(indices[r])] for r in reps}
    order = [str(indices[r]) for r, c in zip(reps, clusters) for _ in c]
    return EmulatorStack(blocks, middle.spec, middle.rotary, order)


def selection_chunks(chunks: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` chunks spread evenly over ``(n, seq)`` corpus chunks (all of them if fewer)."""
    if len(chunks) <= count:
        return chunks
    return chunks[torch.linspace(0, len(chunks) - 1, count).long()]
