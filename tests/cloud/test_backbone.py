"""The backbone runner in fp32 and bf16: the reference is the fp32 segment in autograd."""

import pytest
import torch

from cloud.backbone.dlora import DloraBackbone
from cloud.backbone.local import LocalBackbone
from emulator.adapters.remote_sites import plan_remote_sites
from emulator.model.loading import compute_dtype
from emulator.model.segments import extract_middle, plan_for
from tests.tiny_models import tiny_model


def reference(middle, h, grad_out):
    x = h.clone().requires_grad_(True)
    out = middle(x)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    return out.detach(), grad


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_backbone_tracks_fp32_and_speaks_fp32(family):
    model = tiny_model(family)
    plan = plan_for(model.config, 1)
    torch.manual_seed(0)
    h, g = torch.randn(2, 6, model.config.hidden_size), torch.randn(2, 6, model.config.hidden_size)
    want_out, want_grad = reference(extract_middle(model, plan), h, g)
    runner = LocalBackbone(extract_middle(model, plan), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in runner.segment.parameters())
    out, pending, _ = runner.forward(h, keep_graph=True)
    assert pending is not None
    grad, _ = runner.backward(pending, g)
    assert out.dtype == grad.dtype == torch.float32  # the wire side never sees bf16 tensors
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, compounded over the blocks.
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(out, want_out) < 3e-2 and rel(grad, want_grad) < 5e-2
    exact, pending, _ = LocalBackbone(extract_middle(model, plan)).forward(h, keep_graph=True)
    torch.testing.assert_close(exact, want_out)  # fp32 stays the exact reference path
    assert rel(out, want_out) > 0  # and bf16 really ran in bf16


class _ZeroLora:
    """An edge answering every site with a zero LoRA output and a zero input gradient."""

    def __init__(self):
        self.calls = []

    def forward(self, group, x):
        self.calls.append(x.dtype)
        return torch.zeros(*x.shape[:-1], group.out_features)

    def backward(self, group, grad):
        return torch.zeros(*grad.shape[:-1], group.in_features)


def test_dlora_on_a_bf16_middle_matches_the_plain_bf16_middle():
    model = tiny_model("llama")
    plan = plan_for(model.config, 1)
    groups = plan_remote_sites(model, plan, ("q_proj", "v_proj"))
    middle = LocalBackbone(extract_middle(model, plan), torch.bfloat16).segment
    dlora = DloraBackbone(middle, groups)
    h = torch.randn(2, 4, model.config.hidden_size)
    edge = _ZeroLora()
    all_sites = frozenset(s.index for grp in groups for s in grp.sites)
    out, pending, _ = dlora.forward(h, True, all_sites, edge)  # type: ignore[arg-type]
    grad, _ = dlora.backward(pending, torch.ones_like(out))
    plain, plain_pending, _ = LocalBackbone(middle, torch.bfloat16).forward(h, True)
    plain_grad, _ = LocalBackbone(middle, torch.bfloat16).backward(plain_pending, torch.ones_like(out))
    assert edge.calls and set(edge.calls) == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in middle.parameters())  # never converted by a session
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(grad, plain_grad)


def test_compute_dtype_names():
    assert compute_dtype("bf16") is torch.bfloat16 and compute_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="--backbone-dtype 'int4': choose from"):
        compute_dtype("int4", "--backbone-dtype")
