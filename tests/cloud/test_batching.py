"""Cross-client batching: coalesced forwards and backwards equal per-session calls, on every family."""

import threading

import pytest
import torch

from cloud.backbone.batching import BatchingRunner
from emulator.model.runner import RunnerError, SegmentRunner
from emulator.model.segments import extract_middle, plan_for
from tests.tiny_models import tiny_model

SHAPES = [(2, 5), (1, 9), (3, 3), (2, 7)]  # (batch, seq) of four sessions: different sequence lengths


def _concurrently(fn, n):
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_batched_equals_per_session(family):
    model = tiny_model(family)
    plan = plan_for(model.config, 1)
    hidden = model.config.hidden_size
    torch.manual_seed(1)
    xs = [torch.randn(b, s, hidden) for b, s in SHAPES]
    gs = [torch.randn(b, s, hidden) for b, s in SHAPES]
    plain = SegmentRunner(extract_middle(model, plan))
    want = []
    for i, (x, g) in enumerate(zip(xs, gs)):
        out, _ = plain.forward(f"s{i}", 1, x, train=True)
        grad, _ = plain.backward(f"s{i}", 1, g)
        evaluated, _ = plain.forward(f"s{i}", 2, x, train=False)
        want.append((out, grad, evaluated))
    batched = BatchingRunner(extract_middle(model, plan), window_s=0.2)
    try:
        outs = _concurrently(lambda i: batched.forward(f"s{i}", 1, xs[i], True)[0], len(SHAPES))
        grads = _concurrently(lambda i: batched.backward(f"s{i}", 1, gs[i])[0], len(SHAPES))
        evals = _concurrently(lambda i: batched.forward(f"s{i}", 2, xs[i], False)[0], len(SHAPES))
        assert max(batched.stats.batch_sizes) > 1  # something was coalesced, else this proves nothing
        for i, (out, grad, evaluated) in enumerate(want):
            assert outs[i].shape == out.shape and grads[i].shape == grad.shape
            assert torch.allclose(outs[i], out, rtol=1e-5, atol=1e-5), (family, i)
            assert torch.allclose(grads[i], grad, rtol=1e-5, atol=1e-5), (family, i)
            assert torch.allclose(evals[i], evaluated, rtol=1e-5, atol=1e-5), (family, i)
    finally:
        batched.close()


def test_batched_backward_in_parts_and_errors():
    """A batched graph survives a session's backward arriving late, and refuses a wrong handle or shape."""
    model = tiny_model("llama")
    plan = plan_for(model.config, 1)
    torch.manual_seed(2)
    xs = [torch.randn(1, 4, 32), torch.randn(2, 6, 32)]
    gs = [torch.randn(1, 4, 32), torch.randn(2, 6, 32)]
    plain = SegmentRunner(extract_middle(model, plan))
    want = []
    for i in range(2):
        plain.forward(i, 1, xs[i], train=True)
        want.append(plain.backward(i, 1, gs[i])[0])
    batched = BatchingRunner(extract_middle(model, plan), window_s=0.2)
    try:
        _concurrently(lambda i: batched.forward(i, 1, xs[i], True), 2)
        with pytest.raises(RunnerError, match="shape"):
            batched.backward(0, 1, torch.randn(1, 5, 32))
        with pytest.raises(RunnerError, match="without its training forward"):
            batched.backward(0, 7, gs[0])
        late = [batched.backward(i, 1, gs[i])[0] for i in range(2)]  # one at a time: the graph is retained
        for got, exp in zip(late, want):
            assert torch.allclose(got, exp, rtol=1e-5, atol=1e-5)
        assert batched.release(0) == 0
    finally:
        batched.close()
