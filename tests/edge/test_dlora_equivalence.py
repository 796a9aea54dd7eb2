"""A dlora step computes exactly what an in-process PEFT step with LoRA on every block computes."""

from dataclasses import dataclass

import pytest
import torch
from peft import get_peft_model

from edge.modes.dlora import LocalDloraMiddle, LoraModules, SiteServer
from edge.modes.split import split_step
from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, lora_parameters, peft_config
from emulator.adapters.lora_bank import LoraBank
from emulator.adapters.remote_sites import plan_remote_sites
from emulator.model.arch import ArchSpec, arch_for
from emulator.model.segments import EdgeModel, split_causal_lm
from protocol.accounting import Traffic
from tests.conftest import FAMILIES
from tests.edge.test_split_equivalence import make_batch
from tests.tiny_models import tiny_model


@dataclass
class Setup:
    edge: EdgeModel
    bank: LoraBank
    middle: object
    spec: ArchSpec
    settings: LoraSettings
    full: torch.nn.Module  # the base model, without LoRA


def dlora_setup(family: str, targets=(), k=2, seed=3) -> Setup:
    model = tiny_model(family)
    spec = arch_for(model.config)
    settings = LoraSettings(rank=4, alpha=8, targets=targets)
    split = split_causal_lm(model, k)
    edge = add_lora(split.edge, settings, spec)
    bank = LoraBank(plan_remote_sites(model, split.plan, settings.resolved_targets(spec)), settings)
    torch.manual_seed(seed)
    for p in [*lora_parameters(edge).values(), *bank.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    return Setup(edge, bank, split.middle, spec, settings, model)


def peft_reference(s: Setup, exclude: frozenset[str] = frozenset()):
    """The whole model with PEFT LoRA on every module of ``s`` but ``exclude``, same weights."""
    state = dlora_state(s)
    targets = {k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in state} - exclude
    config = peft_config(s.edge, s.settings, s.spec, "tiny", extra_targets=sorted(targets))
    config.target_modules = sorted(targets)
    ref = get_peft_model(tiny_model(s.full.config.model_type), config)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            if name in params:
                params[name].copy_(value)
    return ref


def dlora_state(s: Setup) -> dict[str, torch.Tensor]:
    return {**adapter_state_dict(s.edge, s.spec), **s.bank.adapter_state_dict()}


def dlora_grads(s: Setup) -> dict[str, torch.Tensor | None]:
    """LoRA gradients under PEFT's saved names, edge-held and cloud-held."""
    grads = {k: p.grad for k, p in zip(adapter_state_dict(s.edge, s.spec), lora_parameters(s.edge).values())}
    for site in s.bank.sites:
        for matrix, weight in zip(("lora_A", "lora_B"), s.bank.lora_weights(site)):
            grads[f"base_model.model.{site.name}.{matrix}.weight"] = weight.grad
    return grads


def reference_grads(ref) -> dict[str, torch.Tensor]:
    return {n.replace(".default.", "."): p.grad for n, p in ref.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [(), ("all",)])
def test_dlora_step_matches_peft_step_with_every_module_active(family, targets):
    s = dlora_setup(family, targets)
    ids, labels = make_batch()
    ref = peft_reference(s)
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    out = split_step(s.edge, LocalDloraMiddle(s.middle, SiteServer(s.bank)), 1, ids, labels, Traffic())
    assert out.loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    grads, expected = dlora_grads(s), reference_grads(ref)
    assert set(grads) == set(expected) and any(site.name in k for k in grads for site in s.bank.sites)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-6, msg=key)
        assert grad.abs().sum() > 0, key


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_killed_module_contributes_nothing_and_gets_no_gradient(family):
    s = dlora_setup(family)
    server = SiteServer(s.bank)
    modules = LoraModules(s.edge, s.spec, server)
    cloud_site = s.bank.sites[0].name  # shares its group with an active site in LLaMA (q with v)
    edge_site = next(iter(modules.layers))
    killed = frozenset({cloud_site, edge_site})
    modules.set_active(frozenset(modules.names) - killed)
    ids, labels = make_batch()
    ref = peft_reference(s, exclude=killed)
    ref_loss = ref(input_ids=ids, labels=labels).loss
    ref_loss.backward()
    out = split_step(s.edge, LocalDloraMiddle(s.middle, server), 1, ids, labels, Traffic())
    assert out.loss == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    expected = reference_grads(ref)
    for key, grad in dlora_grads(s).items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        if module in killed:
            assert grad is None, key
        else:
            torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_in_process_dlora_runs_a_bf16_middle_like_the_wire():
    """A bf16 middle (as the cloud runs it) gets its site answers computed in fp32 and back in bf16: the
    step runs and its loss and bank gradients stay near the fp32 step's."""
    s = dlora_setup("llama")
    ids, labels = make_batch()
    fp32 = split_step(s.edge, LocalDloraMiddle(s.middle, SiteServer(s.bank)), 1, ids, labels, Traffic())
    ref = [w.grad.clone() for site in s.bank.sites for w in s.bank.lora_weights(site)]
    s.bank.zero_grad()
    s.edge.zero_grad()
    half = split_step(s.edge, LocalDloraMiddle(s.middle.to(torch.bfloat16), SiteServer(s.bank)), 1, ids, labels,
                      Traffic())
    got = [w.grad for site in s.bank.sites for w in s.bank.lora_weights(site)]
    assert all(g is not None and g.dtype == torch.float32 for g in got)
    assert half.loss == pytest.approx(fp32.loss, rel=0.05)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in got]),
                                                torch.cat([g.flatten() for g in ref]), dim=0)
    assert cos > 0.95
