"""Kill-and-Revive: the rules on synthetic scores, then kill and revive inside a real tiny dlora run."""

import json

import pytest
import torch

from edge.modes.dlora import LocalDloraMiddle, LoraModules, SiteServer, lora_step_flops
from edge.modes.kill_revive import KillRevive, KillReviveConfig
from edge.modes.split import split_step
from edge.training.recipes import TrainConfig, _train_loop
from emulator.adapters.lora import LoraSettings
from emulator.adapters.lora_bank import LoraBank
from emulator.adapters.remote_sites import RemoteSite, SiteGroup
from emulator.data.datasets import load_train
from protocol.accounting import Traffic
from tests.edge.test_dlora_equivalence import dlora_setup
from tests.edge.test_split_equivalence import make_batch
from tests.tiny_models import tiny_tokenizer


def test_budget_keeps_the_top_scores_and_probes_revive():
    kr = KillRevive(["a", "b", "c", "d"], KillReviveConfig(budget=0.5, probe_every=3, ema=0.5, warmup=1))
    plan = kr.plan(1)
    assert plan.probe and plan.active == {"a", "b", "c", "d"}
    kr.observe(1, plan, {"a": 1.0, "b": 0.0, "c": 3.0, "d": 2.0})
    assert kr.active == {"c", "d"}
    plan = kr.plan(2)
    assert not plan.probe and plan.active == {"c", "d"}
    kr.observe(2, plan, {"c": 1.0, "d": 4.0})
    assert kr.scores == {"a": 1.0, "b": 0.0, "c": 2.0, "d": 3.0}  # EMA over computed steps only
    kr.observe(3, kr.plan(3), {"c": 1.0, "d": 4.0})
    plan = kr.plan(4)
    assert plan.probe
    kr.observe(4, plan, {"a": 0.1, "b": 9.0, "c": 1.0, "d": 4.0})  # b came back from killed: score reset to 9
    assert kr.active == {"b", "d"}
    assert [(e.step, e.kind, e.module) for e in kr.events] == [
        (1, "kill", "a"), (1, "kill", "b"), (4, "kill", "c"), (4, "revive", "b")]


def test_budget_one_never_kills_and_config_problems_are_listed():
    kr = KillRevive(["a", "b"], KillReviveConfig())
    for step in range(1, 5):
        plan = kr.plan(step)
        kr.observe(step, plan, {"a": 0.0, "b": 1.0})
        assert plan.active == {"a", "b"} and not plan.probe
    assert KillReviveConfig(budget=0.0, probe_every=0, ema=1.0).problems() == [
        "--kr-budget 0.0: must be a fraction in (0, 1]", "--kr-probe-every 0: must be at least 1",
        "--kr-ema 1.0: must be in [0, 1)"]
    assert KillReviveConfig(warmup=0).problems() == [
        "--kr-warmup 0: must be at least 1 (the first ranking needs a measured step)"]


def test_warmup_trains_everything_and_ranks_on_its_average():
    kr = KillRevive(["a", "b", "c"], KillReviveConfig(budget=0.3, probe_every=2, ema=0.5, warmup=3))
    grads = [{"a": 4.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": 1.0, "c": 1.0}, {"a": 0.0, "b": 2.0, "c": 1.0}]
    for step, g in enumerate(grads, 1):
        plan = kr.plan(step)
        assert plan.active == {"a", "b", "c"} and plan.probe == (step == 3)
        kr.observe(step, plan, g)
    # a: 4 -> 2 -> 1; b: 0 -> 0.5 -> 1.25; c: 1 throughout. The first step alone would have kept a.
    assert kr.scores == {"a": 1.0, "b": 1.25, "c": 1.0} and kr.active == {"b"}
    assert [kr.plan(s).probe for s in (4, 5, 6, 7)] == [False, True, False, True]


def test_lora_flops_formula_matches_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    group = SiteGroup(0, 0, (RemoteSite(0, "model.layers.0.mlp.up_proj", 0, "mlp.up_proj", 24, 40),))
    bank = LoraBank([group], LoraSettings(rank=4, alpha=8))
    x = torch.randn(3, 5, 24, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        bank(group, x).sum().backward()
    assert counter.get_total_flops() == lora_step_flops(15, 4, 24, 40)


class ForcedGradient:
    """Gradient hook: zero for the first ``zero_calls`` steps the module is computed, then x1000."""

    def __init__(self, zero_calls: int) -> None:
        self.zero_calls, self.calls = zero_calls, 0

    def __call__(self, grad):
        self.calls += 1
        return torch.zeros_like(grad) if self.calls <= 2 * self.zero_calls else grad * 1000


@pytest.fixture
def tiny_train(tmp_path):
    rows = [{"prompt": f"Review: {'good' if i % 2 else 'bad'} {i}\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(16)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    identity = tmp_path / "identity"
    identity.mkdir()
    return path, identity


def test_zero_gradient_module_is_killed_and_revived_when_it_becomes_useful(tiny_train, tmp_path):
    path, identity = tiny_train
    s = dlora_setup("llama")
    torch.nn.init.zeros_(s.bank.lora_weights(s.bank.sites[0])[1])
    server = SiteServer(s.bank)
    modules = LoraModules(s.edge, s.spec, server)
    target = s.bank.sites[0].name
    hook = ForcedGradient(zero_calls=1)
    for p in modules.parameters(target):  # two parameters: the hook fires twice per computed step
        p.register_hook(hook)
    before = [p.detach().clone() for p in modules.parameters(target)]
    cfg = TrainConfig(cloud="-", identity=identity, data=path, out=tmp_path / "run", mode="dlora", steps=8,
                      batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0, lora=s.settings,
                      kr=KillReviveConfig(budget=0.5, probe_every=4, warmup=1))
    data = load_train(path, tiny_tokenizer(), 32)
    records, tally, kr = _train_loop(s.edge, LocalDloraMiddle(s.middle, server), modules, data, 0, cfg)
    events = [(e.step, e.kind) for e in kr.events if e.module == target]
    assert events == [(1, "kill"), (5, "revive")]
    assert hook.calls == 2 * 5  # computed at step 1 (zeroed), killed for 2..4, back from the probe at step 5
    assert tally.steps_active[target] == 5
    assert [r.active_modules for r in records] == [12, 6, 6, 6, 12, 6, 6, 6]
    assert [r.probe for r in records] == [True, False, False, False, True, False, False, False]
    after = [p.detach() for p in modules.parameters(target)]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # it trained once revived
    in_f, out_f = modules.dims(target)
    assert tally.flops[target] == 5 * lora_step_flops(records[0].tokens, 4, in_f, out_f)
    assert sum(r.lora_flops for r in records) == sum(tally.flops.values())


def test_a_killed_module_is_not_trained_by_the_probes_that_measure_it(tiny_train, tmp_path):
    path, identity = tiny_train
    s = dlora_setup("llama")
    server = SiteServer(s.bank)
    modules = LoraModules(s.edge, s.spec, server)
    target = s.bank.sites[0].name
    for p in modules.parameters(target):  # tiny but non-zero gradients: always ranked last, never revived
        p.register_hook(lambda g: g * 1e-6)
    cfg = TrainConfig(cloud="-", identity=identity, data=path, out=tmp_path / "run", mode="dlora", steps=9,
                      batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0, lora=s.settings,
                      kr=KillReviveConfig(budget=0.5, probe_every=3, warmup=3))
    data = load_train(path, tiny_tokenizer(), 32)
    initial = [p.detach().clone() for p in modules.parameters(target)]
    snapshots = []
    real_drop = modules.drop_grads

    def drop_and_snapshot(names):
        real_drop(names)
        snapshots.append([p.detach().clone() for p in modules.parameters(target)])

    modules.drop_grads = drop_and_snapshot  # type: ignore[method-assign]
    records, _, kr = _train_loop(s.edge, LocalDloraMiddle(s.middle, server), modules, data, 0, cfg)
    assert [r.probe for r in records] == [False, False, True, False, False, True, False, False, True]
    assert [r.active_modules for r in records] == [12, 12, 12, 6, 6, 12, 6, 6, 12]
    assert [(e.step, e.kind) for e in kr.events if e.module == target] == [(3, "kill")]
    final = [p.detach() for p in modules.parameters(target)]
    assert len(snapshots) == 3  # at each probe, before its optimizer step
    assert any(not torch.equal(a, b) for a, b in zip(initial, final))  # warm-up steps 1-2 trained it
    for snap in snapshots:  # killed by the probe at step 3: that probe and those at 6 and 9 left it alone
        assert all(torch.equal(a, b) for a, b in zip(snap, final))


def test_taylor_importance_is_the_loss_change_of_removing_the_update():
    s = dlora_setup("llama")
    server = SiteServer(s.bank)
    modules = LoraModules(s.edge, s.spec, server)
    link = LocalDloraMiddle(s.middle, server)
    ids, labels = make_batch()

    def loss() -> float:
        for p in [*s.edge.parameters(), *s.bank.parameters()]:
            p.grad = None
        return split_step(s.edge, link, 1, ids, labels, Traffic()).loss

    loss()
    taylor, grads = modules.importance("taylor"), modules.importance("grad")
    assert set(taylor) == set(grads) == set(modules.names) and grads == modules.grad_norms()
    site = s.bank.sites[0]
    b = s.bank.lora_weights(site)[1]
    assert taylor[site.name] == pytest.approx(abs(float((b.grad * b).sum())))
    with_update = loss()
    predicted = float((b.grad * b).sum())
    modules.set_active(frozenset(modules.names) - {site.name})  # the module's update taken away
    without = loss()
    assert with_update - without == pytest.approx(predicted, rel=0.1)  # first order: a few % off here
    modules.set_active(frozenset(modules.names))
    for name in modules.names:
        torch.nn.init.zeros_(modules._lora_b(name))
    loss()
    assert set(modules.importance("taylor").values()) == {0.0}  # nothing learnt yet, nothing to lose
