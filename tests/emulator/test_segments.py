import pytest
import torch

from emulator.model.arch import UnsupportedArchitectureError, arch_for
from emulator.model.segments import SplitError, SplitPlan, full_model_name, split_causal_lm
from tests.conftest import FAMILIES
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 2])
def test_split_composes_to_full_model(family, k):
    model = tiny_model(family)
    split = split_causal_lm(model, k)
    ids = torch.randint(1, 96, (3, 11))
    with torch.no_grad():
        ref = model(ids).logits
        out = split.edge.top(split.middle(split.edge.bottom(ids)))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_is_pure(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = split_causal_lm(model, 2)
    for p in split.edge.parameters():
        p.data.add_(1.0)
    for p in split.middle.parameters():
        p.data.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_segments_hold_only_their_blocks():
    model = tiny_model("llama", layers=6)
    split = split_causal_lm(model, 2)
    assert split.edge.bottom.stack.indices == [0, 1]
    assert split.edge.top.stack.indices == [4, 5]
    assert split.middle.indices == [2, 3]
    edge_blocks = {n.split(".")[3] for n, _ in split.edge.named_parameters() if ".layers." in n}
    assert edge_blocks == {"0", "1", "4", "5"}


def test_plan_rejects_edge_owning_everything():
    with pytest.raises(SplitError, match="leaves no middle"):
        SplitPlan(6, 3)
    with pytest.raises(SplitError, match="at least 1"):
        SplitPlan(6, 0)


def test_full_model_name_mapping():
    spec = arch_for(tiny_model("opt").config)
    name = full_model_name("top.stack.layers.5.self_attn.q_proj.weight", spec)
    assert name == "model.decoder.layers.5.self_attn.q_proj.weight"


def test_unknown_architecture_is_reported():
    class Cfg:
        model_type = "bert"

    with pytest.raises(UnsupportedArchitectureError, match="supported: gpt2"):
        arch_for(Cfg())
