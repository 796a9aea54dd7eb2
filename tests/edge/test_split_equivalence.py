"""One split step computes exactly what an in-process PEFT step on the whole model computes."""

import pytest
import torch
from peft import get_peft_model

from edge.modes.split import LocalMiddle, split_step
from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, lora_parameters, peft_config
from emulator.data.datasets import IGNORE
from emulator.model.arch import arch_for
from emulator.model.segments import split_causal_lm
from protocol.accounting import Traffic
from tests.conftest import FAMILIES
from tests.tiny_models import tiny_model


def make_batch(seed=0, batch=4, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = IGNORE  # loss on the "completion" half only
    labels[0, -2:] = IGNORE  # a right-padded row
    ids[0, -2:] = 0
    return ids, labels


def reference_and_split(family, k=2, targets=()):
    model = tiny_model(family)
    spec = arch_for(model.config)
    settings = LoraSettings(rank=4, alpha=8, targets=targets)
    split = split_causal_lm(model, k)
    edge = add_lora(split.edge, settings, spec)
    torch.manual_seed(3)
    for p in lora_parameters(edge).values():
        torch.nn.init.normal_(p, std=0.1)
    ref = get_peft_model(model, peft_config(edge, settings, spec, "tiny"))
    state = adapter_state_dict(edge, spec)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            ref_params[key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")].copy_(value)
    return ref, edge, split.middle, spec


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [(), ("all",)])
def test_split_step_matches_peft_step(family, targets):
    ref, edge, middle, spec = reference_and_split(family, targets=targets)
    ids, labels = make_batch()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    out = split_step(edge, LocalMiddle(middle), 1, ids, labels, Traffic())
    assert out.loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    grads = {n: p.grad for n, p in lora_parameters(edge).items()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    assert len(grads) == len(ref_grads) > 0
    edge_state = {k: grads[n] for n, k in zip(lora_parameters(edge), adapter_state_dict(edge, spec))}
    for key, grad in edge_state.items():
        ref_key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        torch.testing.assert_close(grad, ref_grads[ref_key], rtol=1e-4, atol=1e-6)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_bf16_middle_tracks_the_fp32_step(family):
    """A frozen middle in bf16 (``--emulator-dtype bfloat16``): fp32 at the boundary, close to fp32."""
    import copy

    _, edge, middle, _ = reference_and_split(family)
    ids, labels = make_batch()
    exact = split_step(edge, LocalMiddle(middle), 1, ids, labels, Traffic())
    want = {n: p.grad.clone() for n, p in lora_parameters(edge).items()}
    edge.zero_grad(set_to_none=True)
    link = LocalMiddle(copy.deepcopy(middle).to(torch.bfloat16))
    hidden, _ = link.forward(1, torch.randn(2, 5, 32), False, Traffic())
    assert link.dtype is torch.bfloat16 and hidden.dtype is torch.float32
    approx = split_step(edge, link, 1, ids, labels, Traffic())
    assert approx.loss == pytest.approx(exact.loss, rel=2e-2) and approx.loss != exact.loss
    for name, p in lora_parameters(edge).items():
        assert p.grad.dtype is torch.float32
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 0.1, name


@pytest.mark.parametrize("family", FAMILIES)
def test_a_step_with_a_frozen_bottom_matches_the_top_gradients_and_skips_the_middle_backward(family):
    """offsite --tune lora-top: the bottom blocks' LoRA is frozen, so the step runs the middle forward only,
    and the top blocks' LoRA gets exactly the gradients of the PEFT step on the whole model."""
    ref, edge, middle, spec = reference_and_split(family)
    ids, labels = make_batch()
    ref(input_ids=ids, labels=labels).loss.backward()
    for name, param in lora_parameters(edge).items():
        param.requires_grad_(name.startswith("top."))
    link = LocalMiddle(middle)
    backward_calls = []
    link.backward = lambda *a: backward_calls.append(a)  # type: ignore[method-assign]
    split_step(edge, link, 1, ids, labels, Traffic())
    assert backward_calls == []
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "lora_" in n}
    named = lora_parameters(edge)
    checked = 0
    for (name, param), key in zip(named.items(), adapter_state_dict(edge, spec)):
        if name.startswith("top."):
            ref_key = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            torch.testing.assert_close(param.grad, ref_grads[ref_key], rtol=1e-4, atol=1e-6)
            checked += 1
        else:
            assert param.grad is None, name
    assert 0 < checked < len(named)


def test_training_only_the_top_lora_through_the_training_loop_keeps_the_bottom_frozen(tmp_path):
    """The recipe's loop (which switches LoRA modules on every step) leaves a frozen bottom frozen: its B
    stays zero, the top's moves, and the middle never runs a backward."""
    import json

    from edge.training.recipes import TrainConfig, train_loop
    from emulator.data.datasets import load_train
    from tests.tiny_models import tiny_tokenizer

    rows = [{"prompt": f"Review: {'good' if i % 2 else 'bad'} {i}\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(16)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "identity").mkdir()
    model = tiny_model("llama")
    split = split_causal_lm(model, 2)
    edge = add_lora(split.edge, LoraSettings(rank=4, alpha=8), arch_for(model.config))
    lora = lora_parameters(edge)
    for name, param in lora.items():
        param.requires_grad_(name.startswith("top."))
    top = [p for n, p in lora.items() if n.startswith("top.")]
    link = LocalMiddle(split.middle)
    backward_calls = []
    link.backward = lambda *a: backward_calls.append(a)  # type: ignore[method-assign]
    cfg = TrainConfig(cloud="-", identity=tmp_path / "identity", data=path, out=tmp_path / "run", mode="offsite",
                      tune="lora-top", steps=3, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0,
                      checkpoint_every=0)
    train_loop(edge, link, load_train(path, tiny_tokenizer(), 32), 0, cfg, top)
    assert backward_calls == []
    b = {n: p for n, p in lora.items() if ".lora_B." in n}
    assert all(not p.requires_grad and p.abs().sum() == 0 for n, p in b.items() if n.startswith("bottom."))
    assert any(p.abs().sum() > 0 for n, p in b.items() if n.startswith("top."))
