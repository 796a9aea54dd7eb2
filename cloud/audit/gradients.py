"""Reading the label from the gradient the edge sends back at the top cut (split and dlora modes).

The cloud holds the state it sent up (``upper``) and the base weights of the edge's top blocks and
head. For a row whose loss is on one completion token, the returned gradient is
``J^T (softmax - onehot(label))`` at that position; the attacker recomputes the gradient for every
candidate label with the base top and keeps the one most aligned (cosine) with what it received.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def label_from_gradient(top_features: Callable[[torch.Tensor], torch.Tensor], lm_head: torch.nn.Module,
                        upper: torch.Tensor, grad: torch.Tensor, candidates: list[int]) -> int:
    """The candidate label whose base-model gradient best matches the observed one.

    Args:
        top_features: base top blocks + final norm, ``(1, seq, hidden)`` -> ``(1, seq, hidden)``.
        upper: ``(seq, hidden)`` the state the cloud sent to the edge's top.
        grad: ``(seq, hidden)`` the gradient the edge sent back.
        candidates: token ids the label may be (e.g. the task's answer tokens).
    """
    nonzero = grad.float().norm(dim=-1) > 0
    if not bool(nonzero.any()):
        return candidates[0]
    position = int(nonzero.nonzero().max())  # causal: nothing after the label position gets a gradient
    best, best_sim = candidates[0], -2.0
    for token in candidates:
        state = upper[None].detach().float().requires_grad_(True)
        logits = lm_head(top_features(state)[0, position])
        F.cross_entropy(logits[None].float(), torch.tensor([token])).backward()
        assert state.grad is not None
        sim = F.cosine_similarity(state.grad[0].flatten(), grad.float().flatten(), dim=0).item()
        if sim > best_sim:
            best, best_sim = token, sim
    return best
