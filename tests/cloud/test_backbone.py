"""The backbone seam's in-process runner in fp32 and bf16: the reference is the fp32 segment in autograd."""

import gc
import weakref

import pytest
import torch

from cloud.backbone.seam import RunnerError, local_runner
from emulator.adapters.remote_sites import RemoteSiteCalls, SiteTap, plan_remote_sites
from emulator.model.loading import compute_dtype
from emulator.model.runner import SegmentRunner
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
    runner = SegmentRunner(extract_middle(model, plan), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in runner.segment.parameters())
    out, compute_fwd = runner.forward("s", 1, h, train=True)
    grad, compute_bwd = runner.backward("s", 1, g)
    assert out.dtype == grad.dtype == torch.float32  # the wire side never sees bf16 tensors
    assert compute_fwd > 0 and compute_bwd > 0
    # bf16 keeps 8 bits of mantissa: relative error of a few 1e-3 per op, compounded over the blocks.
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(out, want_out) < 3e-2 and rel(grad, want_grad) < 5e-2
    exact, _ = local_runner(extract_middle(model, plan)).forward("s", 1, h, train=False)
    torch.testing.assert_close(exact, want_out)  # fp32 stays the exact reference path
    assert rel(out, want_out) > 0  # and bf16 really ran in bf16


def test_graphs_are_kept_by_handle_and_released_per_session():
    model = tiny_model("llama")
    middle = extract_middle(model, plan_for(model.config, 1))
    runner = SegmentRunner(middle)
    h = torch.randn(2, 4, model.config.hidden_size)
    runner.forward("a", 1, h, True)
    runner.forward("a", 2, 2 * h, True)
    runner.forward("b", 1, h, True)
    runner.forward("b", 2, h, False)  # an evaluation forward keeps nothing
    assert runner.pending("a") == [1, 2] and runner.pending("b") == [1]
    _, want = reference(middle, 2 * h, torch.ones_like(h))
    grad, _ = runner.backward("a", 2, torch.ones_like(h))  # steps of one session are independent handles
    torch.testing.assert_close(grad, want)
    with pytest.raises(RunnerError, match="without its training forward"):
        runner.backward("a", 2, torch.ones_like(h))
    with pytest.raises(RunnerError, match="does not match the activation"):
        runner.backward("a", 1, torch.ones(1, 4, model.config.hidden_size))
    assert runner.release("a") == 1 and runner.pending("a") == [] and runner.pending("b") == [1]


def test_release_frees_the_graph():
    model = tiny_model("llama")
    runner = SegmentRunner(extract_middle(model, plan_for(model.config, 1)))
    runner.forward("a", 1, torch.randn(2, 4, model.config.hidden_size), True)
    ref = weakref.ref(runner._pending[("a", 1)].outputs)
    runner.release("a")
    gc.collect()
    assert ref() is None


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
    runner = SegmentRunner(extract_middle(model, plan), torch.bfloat16)
    h = torch.randn(2, 4, model.config.hidden_size)
    plain, _ = runner.forward("plain", 1, h, True)
    plain_grad, _ = runner.backward("plain", 1, torch.ones_like(plain))
    edge = _ZeroLora()
    all_sites = frozenset(s.index for grp in groups for s in grp.sites)
    out, _ = runner.forward("dlora", 1, h, True, RemoteSiteCalls(groups, all_sites, edge))
    grad, _ = runner.backward("dlora", 1, torch.ones_like(out))
    assert edge.calls and set(edge.calls) == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in runner.segment.parameters())  # never converted by a session
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(grad, plain_grad)


def test_site_taps_are_installed_once_and_route_only_their_forward():
    """No per-step copy: the shared middle is tapped once; a split forward beside a dlora one is untouched."""
    model = tiny_model("llama")
    plan = plan_for(model.config, 1)
    groups = plan_remote_sites(model, plan, ("q_proj", "v_proj"))
    middle = extract_middle(model, plan)
    want, _ = reference(extract_middle(model, plan), torch.ones(1, 3, model.config.hidden_size),
                        torch.ones(1, 3, model.config.hidden_size))
    runner = SegmentRunner(middle)

    class Ones(_ZeroLora):
        def forward(self, group, x):
            return torch.ones(*x.shape[:-1], group.out_features)

    h = torch.ones(1, 3, model.config.hidden_size)
    for step in range(3):
        shifted, _ = runner.forward("d", step, h, False, RemoteSiteCalls(groups, {0, 1}, Ones()))
        assert not torch.allclose(shifted, want)  # the routed sites added the edge's outputs
    taps = [m for m in runner.segment.modules() if isinstance(m, SiteTap)]
    assert len(taps) == sum(len(g.sites) for g in groups)  # one tap per site, however many steps
    plain, _ = runner.forward("s", 0, h, False)
    torch.testing.assert_close(plain, want)  # unrouted taps compute exactly the frozen projection


def test_compute_dtype_names():
    assert compute_dtype("bf16") is torch.bfloat16 and compute_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="--backbone-dtype 'int4': choose from"):
        compute_dtype("int4", "--backbone-dtype")
