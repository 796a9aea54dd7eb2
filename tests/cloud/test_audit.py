"""The owner's audit on a tiny model: undefended states are inverted, every defence lowers recovery."""

from __future__ import annotations

import pytest
import torch

from cloud.audit.gradients import label_from_gradient
from cloud.audit.inversion import Recovery, lcs_length, rouge_l, score
from cloud.audit.membership import auc
from cloud.audit.suite import AuditSettings, audit
from edge.modes.split import LocalMiddle, completion_loss, split_step, transmitted
from emulator.adapters.lora import LoraSettings, add_lora
from emulator.data.datasets import IGNORE
from emulator.model.segments import EdgeModel, split_causal_lm
from emulator.privacy.defence import DefenceError, DefenceSettings, distance_correlation
from protocol.accounting import Traffic
from tests.tiny_models import VOCAB, tiny_model

SETTINGS = AuditSettings(top_k=8, a2_rows=24, mlp_steps=100, mlp_width=256)


def mixing_model(layers: int = 8):
    """A tiny LLaMA whose blocks write 10x more into the residual stream than at initialisation,
    so (as in a trained model) a deeper cut hides more of the embedding."""
    model = tiny_model("llama", layers=layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    return model


def rows(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (int(torch.randint(8, 17, (1,), generator=g)),), generator=g) for _ in range(n)]


OWNER = torch.randint(2, VOCAB, (200, 16), generator=torch.Generator().manual_seed(0))  # the owner's own text
EDGE_ROWS = rows(1, 24)  # the edge's private rows, never seen by the owner


def run_audit(edge: EdgeModel, base: EdgeModel, defence: DefenceSettings) -> dict[str, Recovery]:
    """States the (possibly trained) edge sends for its rows, attacked with the base weights."""
    torch.manual_seed(99)  # the edge's noise draws; the owner draws its own
    with torch.no_grad():
        observed = [transmitted(edge.bottom(r[None]), defence)[0] for r in EDGE_ROWS]
    head = lambda h: base.top.lm_head(base.top.final_norm(h))  # noqa: E731
    results = audit(observed, [r.tolist() for r in EDGE_ROWS], base.bottom, base.bottom.embed_tokens.weight, head,
                    OWNER, defence, SETTINGS)
    return {r.attack: r for r in results}


@pytest.fixture(scope="module")
def k1():
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    return split_causal_lm(mixing_model(), 1).edge


@pytest.fixture(scope="module")
def undefended(k1):
    return run_audit(k1, k1, DefenceSettings())


def test_undefended_states_are_inverted(undefended):
    assert undefended["A1 ridge"].token_recovery >= 0.9
    assert undefended["A2 white-box search"].token_recovery >= 0.95
    assert undefended["A2 white-box search"].row_exact >= 0.8
    # plain nearest-embedding lookup is much weaker: an audit that stopped there would be wrong
    assert undefended["A0 nearest embedding"].token_recovery < undefended["A1 ridge"].token_recovery


def test_noise_lowers_recovery(k1, undefended):
    noisy = run_audit(k1, k1, DefenceSettings(noise=2.0))
    for attack in ("A1 ridge", "A1 MLP", "A2 white-box search"):
        assert noisy[attack].token_recovery < undefended[attack].token_recovery - 0.1, attack


def test_deeper_cut_lowers_recovery(undefended):
    k3 = split_causal_lm(mixing_model(), 3).edge
    deep = run_audit(k3, k3, DefenceSettings())
    for attack in ("A1 ridge", "A2 white-box search"):
        assert deep[attack].token_recovery < undefended[attack].token_recovery - 0.05, attack


def _train(defence: DefenceSettings, steps: int = 30) -> tuple[EdgeModel, EdgeModel]:
    split = split_causal_lm(mixing_model(), 1)
    torch.manual_seed(0)
    edge = add_lora(split.edge, LoraSettings(rank=8, alpha=16, targets=("all",)), split.edge.bottom.spec)
    params = [p for p in edge.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    link = LocalMiddle(split.middle)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        ids = torch.randint(2, VOCAB, (8, 16), generator=g)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = ids[:, 0]  # a toy task: repeat the first token
        split_step(edge, link, step, ids, labels, Traffic(), defence)
        opt.step()
        opt.zero_grad()
    return edge, split.edge


def test_nopeek_lowers_recovery():
    plain, base = _train(DefenceSettings())
    guarded, _ = _train(DefenceSettings(nopeek=5.0))
    before, after = run_audit(plain, base, DefenceSettings()), run_audit(guarded, base, DefenceSettings())
    assert before["A2 white-box search"].token_recovery >= 0.95  # a trained LoRA alone hides little
    assert after["A1 ridge"].token_recovery < before["A1 ridge"].token_recovery - 0.05
    assert after["A2 white-box search"].token_recovery < before["A2 white-box search"].token_recovery - 0.1


def test_label_is_read_from_the_top_cut_gradient():
    split = split_causal_lm(mixing_model(), 1)
    edge, middle = split.edge, split.middle
    hits = 0
    for i, r in enumerate(EDGE_ROWS):
        label = 10 + i % 5
        ids = torch.cat([r, torch.tensor([label])])[None]
        labels = torch.full_like(ids, IGNORE)
        labels[0, -1] = label
        with torch.no_grad():
            upper = middle(edge.bottom(ids))
        upper.requires_grad_(True)
        completion_loss(edge, upper, labels).backward()
        assert upper.grad is not None
        hits += label_from_gradient(edge.top.features, edge.top.lm_head, upper[0].detach(), upper.grad[0],
                                    [10, 11, 12, 13, 14]) == label
    assert hits / len(EDGE_ROWS) >= 0.9


def test_metrics_by_hand():
    assert lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2
    assert rouge_l([1, 2, 3, 4], [2, 4, 3]) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    r = score("x", [[1, 2, 3], [4, 5]], [[1, 2, 0], [4, 5]])
    assert (r.token_recovery, r.row_exact) == (pytest.approx(4 / 5), 0.5)
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0, 3.0], [2.0, 2.0]) == 0.5
    assert auc([2.0], [2.0]) == 0.5


def test_distance_correlation():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    assert distance_correlation(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-4)
    assert distance_correlation(x, y).item() < 0.3


@pytest.mark.parametrize("noise,nopeek", [(-0.1, 0.0), (11.0, 0.0), (float("nan"), 0.0), (0.0, -1.0)])
def test_bad_defence_values_are_rejected(noise, nopeek):
    with pytest.raises(DefenceError, match="--defence-"):
        DefenceSettings(noise, nopeek)
