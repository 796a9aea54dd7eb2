"""Fuzzing the training-stream handler with generated wire messages (hypothesis).

Whatever an edge sends, the handler either answers or raises a domain error (which the servicer
turns into a gRPC status); it never raises anything else, and a good session keeps working.
"""

import collections
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.errors import CloudError
from cloud.rpc.handlers import Coordinator, Limits
from edge.modes.dlora import LocalDloraMiddle, SiteServer
from emulator.adapters.lora import LoraSettings
from emulator.adapters.lora_bank import LoraBank
from emulator.adapters.remote_sites import plan_remote_sites
from emulator.model.arch import arch_for
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol import edgetune_pb2 as pb
from protocol import serde
from protocol.tensors import TensorAssembler, tensor_chunks
from protocol.types import EdgeMessage, OpenSessionRequest, Phase

CASES = 1200


@pytest.fixture(scope="module")
def coordinator(tiny_dirs, tmp_path_factory):
    model = load_causal_lm(tiny_dirs["llama"])
    return Coordinator("tiny", tiny_dirs["llama"], model, tmp_path_factory.mktemp("fuzz-store"), 2,
                       Limits(max_tensor_bytes=1 << 16))


def chunk_strategy():
    dims = st.lists(st.one_of(st.integers(-3, 40), st.integers(0, 2**40)), min_size=0, max_size=4)
    return st.builds(
        pb.TensorChunk, name=st.text(max_size=8), dtype=st.sampled_from(["float32", "bfloat16", "float16", "int8", "",
                                                                          "complex64", "float64"]),
        shape=dims, total_bytes=st.one_of(st.integers(0, 4096), st.integers(0, 2**63)),
        offset=st.one_of(st.integers(0, 64), st.integers(0, 2**63)), data=st.binary(max_size=4096))


def message_strategy(valid_session):
    return st.builds(
        pb.EdgeMessage, session_id=st.one_of(st.just(valid_session), st.text(max_size=12)),
        step=st.integers(0, 2**63), phase=st.integers(0, 11), tensor=st.one_of(st.none(), chunk_strategy()))


def well_formed(session_id, step, phase, shape):
    tensor = torch.randn(*shape)
    return [serde.edge_message_to_proto(EdgeMessage(session_id, step, phase, c)) for c in tensor_chunks("h", tensor)]


@st.composite
def streams(draw, session_id):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            parts.append(draw(message_strategy(session_id)))
        else:  # a plausible message with one field broken, to get past the first checks
            phase = draw(st.sampled_from([Phase.FORWARD_TRAIN, Phase.FORWARD_EVAL, Phase.BACKWARD, Phase.SITE_OUTPUT,
                                          Phase.SITE_GRAD_INPUT]))
            shape = draw(st.sampled_from([(1, 3, 32), (2, 5, 32), (1, 3, 31), (0, 3, 32), (1, 200, 32)]))
            parts.extend(well_formed(session_id, draw(st.integers(0, 3)), phase, shape))
    return parts


def drive(coordinator, owner, messages):
    def decoded():
        for m in messages:
            yield serde.edge_message_from_proto(m)
    try:
        for _ in coordinator.train(owner, decoded()):
            pass
    except (CloudError, serde.WireFormatError):
        pass  # a clear refusal is the expected outcome for garbage


@pytest.mark.parametrize("mode", ["split", "dlora"])
def test_handler_survives_generated_streams(coordinator, mode):
    session = coordinator.open_session("alice", OpenSessionRequest(mode)).session_id
    seen = []

    @settings(max_examples=CASES if mode == "split" else CASES // 2, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(data=st.data())
    def case(data):
        messages = data.draw(streams(session))
        seen.append(len(messages))
        drive(coordinator, data.draw(st.sampled_from(["alice", "bob"])), messages)

    case()
    assert len(seen) >= (1000 if mode == "split" else 500)
    if mode == "dlora":
        dlora_step_matches_reference(coordinator, session)
        return
    # The session still works after all that: a normal forward/backward step round-trips.
    replies = list(coordinator.train("alice", (serde.edge_message_from_proto(m) for m in
                                                well_formed(session, 9, Phase.FORWARD_TRAIN, (1, 4, 32))
                                                + well_formed(session, 9, Phase.BACKWARD, (1, 4, 32)))))
    assert [r.phase for r in replies] == [Phase.ACTIVATION, Phase.GRADIENT]


def dlora_step_matches_reference(coordinator, session):
    """After the fuzzing, a real dlora step on the same session, its site call-outs answered by an edge's bank,
    gives the activation, input gradient and bank gradients of the same step run in-process."""
    model = coordinator.model
    plan = plan_for(model.config, 2)
    groups = plan_remote_sites(model, plan, arch_for(model.config).lora_targets)
    # LoRA A's initialisation draws from the global generator: seeded, so that the bank (and the size of
    # the float rounding the tolerances below allow for) does not depend on what the fuzzing drew before
    torch.manual_seed(0)
    bank = LoraBank(groups, LoraSettings())
    with torch.no_grad():
        for name, param in bank.named_parameters():
            if "lora_B" in name:  # nonzero B: the edge's site answers change the cloud's output
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    reference_bank = copy.deepcopy(bank)
    server = SiteServer(bank)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    got = _serve_dlora_step(coordinator, session, server, hidden, grad)
    link = LocalDloraMiddle(extract_middle(model, plan), SiteServer(reference_bank))
    want_out, _ = link.forward(5, hidden, True, None)
    want_grad, _ = link.backward(5, grad, None)
    torch.testing.assert_close(got[Phase.ACTIVATION], want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[Phase.GRADIENT], want_grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(bank.named_parameters(), reference_bank.parameters()):
        assert p.grad is not None and q.grad is not None, name
        # the two paths sum in different orders: fp32 rounding, about 1e-7 of the gradient's largest value
        # (a dropped or mis-scaled site moves these by 1e-2 and more)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()), msg=name)
    assert (want_out - link.runner.forward("plain", 0, hidden, False)[0]).abs().max() > 1e-3  # the sites mattered


def _serve_dlora_step(coordinator, session, server, hidden, grad):
    """Drives one dlora step through ``coordinator.train`` as an edge would, answering its call-outs."""
    inbox = collections.deque(EdgeMessage(session, 5, Phase.FORWARD_TRAIN, c, active_sites=server.begin(True))
                              for c in tensor_chunks("h", hidden))

    def messages():
        while inbox:
            yield inbox.popleft()

    answers = {Phase.SITE_INPUT: Phase.SITE_OUTPUT, Phase.SITE_GRAD_OUTPUT: Phase.SITE_GRAD_INPUT}
    finals, assembler = {}, TensorAssembler()
    for reply in coordinator.train("alice", messages()):
        tensor = assembler.feed(reply.tensor)
        if tensor is None:
            continue
        if reply.phase in answers:
            _, out = server.answer(reply.phase, reply.site_group, tensor)
            inbox.extend(EdgeMessage(session, 5, answers[reply.phase], c, site_group=reply.site_group)
                         for c in tensor_chunks("s", out))
        else:
            finals[reply.phase] = tensor
            if reply.phase is Phase.ACTIVATION:
                inbox.extend(EdgeMessage(session, 5, Phase.BACKWARD, c) for c in tensor_chunks("g", grad))
    return finals
