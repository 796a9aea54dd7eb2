"""Coordinator handlers in-process: the domain errors a misbehaving edge meets."""

import pytest
import torch

from cloud.errors import FailedPrecondition, InvalidArgument, NotFound
from cloud.rpc.handlers import Coordinator
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol.tensors import TensorAssembler, tensor_chunks
from protocol.types import EdgeMessage, OpenSessionRequest, Phase


@pytest.fixture(scope="module")
def coordinator(tiny_dirs, tmp_path_factory):
    model = load_causal_lm(tiny_dirs["llama"])
    return Coordinator("tiny", tiny_dirs["llama"], model, tmp_path_factory.mktemp("store"), 2)


def messages(session_id, step, phase, tensor, chunk_bytes=1 << 20):
    return [EdgeMessage(session_id, step, phase, c) for c in tensor_chunks("h", tensor, chunk_bytes=chunk_bytes)]


def run(coordinator, owner, msgs):
    out, assembler = [], TensorAssembler()
    for reply in coordinator.train(owner, msgs):
        t = assembler.feed(reply.tensor)
        if t is not None:
            out.append((reply.phase, t))
    return out


def test_forward_backward_round(coordinator):
    sid = coordinator.open_session("alice", OpenSessionRequest("split")).session_id
    h = torch.randn(2, 5, 32)
    replies = run(coordinator, "alice", messages(sid, 1, Phase.FORWARD_TRAIN, h, chunk_bytes=100)
                  + messages(sid, 1, Phase.BACKWARD, torch.ones(2, 5, 32)))
    assert [p for p, _ in replies] == [Phase.ACTIVATION, Phase.GRADIENT]
    middle = extract_middle(coordinator.model, plan_for(coordinator.model.config, 2))
    x = h.clone().requires_grad_(True)
    expected_out = middle(x)
    (expected_grad,) = torch.autograd.grad(expected_out, x, torch.ones_like(expected_out))
    torch.testing.assert_close(replies[0][1], expected_out.detach())
    torch.testing.assert_close(replies[1][1], expected_grad)


@pytest.mark.parametrize("make, error, match", [
    (lambda sid: messages(sid, 1, Phase.FORWARD_TRAIN, torch.randn(1, 3, 31)), InvalidArgument, "must be"),
    (lambda sid: messages(sid, 1, Phase.FORWARD_TRAIN, torch.full((1, 3, 32), float("nan"))), InvalidArgument,
     "NaN or Inf"),
    (lambda sid: messages(sid, 4, Phase.BACKWARD, torch.randn(1, 3, 32)), FailedPrecondition, "without its"),
    (lambda sid: messages(sid, 1, Phase.ACTIVATION, torch.randn(1, 3, 32)), InvalidArgument, "not sent by an edge"),
    (lambda sid: messages("se-unknown", 1, Phase.FORWARD_TRAIN, torch.randn(1, 3, 32)), NotFound, "no session"),
    (lambda sid: [EdgeMessage(sid, 1, Phase.FORWARD_TRAIN)], InvalidArgument, "carries no tensor"),
])
def test_bad_streams_raise_domain_errors(coordinator, make, error, match):
    sid = coordinator.open_session("alice", OpenSessionRequest("split")).session_id
    with pytest.raises(error, match=match):
        run(coordinator, "alice", make(sid))


def test_other_identity_cannot_use_session(coordinator):
    sid = coordinator.open_session("alice", OpenSessionRequest("split")).session_id
    with pytest.raises(NotFound, match="identity 'bob'"):
        run(coordinator, "bob", messages(sid, 1, Phase.FORWARD_TRAIN, torch.randn(1, 3, 32)))


def test_bad_mode_and_depth(coordinator):
    with pytest.raises(InvalidArgument, match="mode 'federated'"):
        coordinator.open_session("alice", OpenSessionRequest("federated"))
    with pytest.raises(InvalidArgument, match="leaves no middle"):
        coordinator.open_session("alice", OpenSessionRequest("split", 3))


def test_sessions_survive_a_restart_for_their_owner_only(tiny_dirs, tmp_path):
    model = load_causal_lm(tiny_dirs["llama"])
    first = Coordinator("tiny", tiny_dirs["llama"], model, tmp_path, 2)
    sid = first.open_session("alice", OpenSessionRequest("split")).session_id
    restarted = Coordinator("tiny", tiny_dirs["llama"], model, tmp_path, 2)  # same store, empty memory
    with pytest.raises(NotFound, match="identity 'bob'"):
        run(restarted, "bob", messages(sid, 1, Phase.FORWARD_TRAIN, torch.randn(1, 3, 32)))
    replies = run(restarted, "alice", messages(sid, 1, Phase.FORWARD_EVAL, torch.randn(1, 3, 32)))
    assert [p for p, _ in replies] == [Phase.ACTIVATION]


def test_an_idle_session_is_evicted_and_its_graph_freed(tiny_dirs, tmp_path):
    """An edge that dies between forward and backward, its stream left open, does not pin the graph."""
    import gc
    import time
    import weakref

    from cloud.rpc.handlers import Limits

    model = load_causal_lm(tiny_dirs["llama"])
    coordinator = Coordinator("tiny", tiny_dirs["llama"], model, tmp_path, 2, Limits(idle_timeout_s=0.3))
    coordinator.sessions.stop_reaper()  # evicted by hand below, at a known time
    sid = coordinator.open_session("alice", OpenSessionRequest("split")).session_id
    stream = coordinator.train("alice", iter(messages(sid, 1, Phase.FORWARD_TRAIN, torch.randn(2, 5, 32))))
    assert next(stream).phase is Phase.ACTIVATION  # the forward ran; the stream stays open, no backward
    runner = coordinator.backend(2).runner
    graph = weakref.ref(runner._pending[(sid, 1)].outputs)  # type: ignore[attr-defined]
    assert coordinator.sessions.evict_idle() == []  # not idle yet
    time.sleep(0.5)
    assert coordinator.sessions.evict_idle() == [sid]
    gc.collect()
    assert graph() is None and coordinator.sessions.find(sid) is None
    assert coordinator.session("alice", sid).pending_step is None  # an edge coming back reopens it, empty
    stream.close()


def test_session_stats_record_the_runners_compute_seconds(coordinator):
    sid = coordinator.open_session("alice", OpenSessionRequest("split")).session_id
    replies = list(coordinator.train("alice", messages(sid, 1, Phase.FORWARD_TRAIN, torch.randn(2, 5, 32))
                                     + messages(sid, 1, Phase.BACKWARD, torch.ones(2, 5, 32))))
    session = coordinator.sessions.find(sid)
    assert session is not None and session.steps == 1
    sent = sum(r.compute_s for r in replies)
    assert session.compute_s > 0 and session.compute_s == pytest.approx(sent)  # what the edge is told
