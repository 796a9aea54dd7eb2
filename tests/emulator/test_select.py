"""Emulator constructions (importance + bridges, CRaSh sharing, uniform + bridges) on tiny LLaMA, GPT-2, OPT:
what they compute, that the bundle holds no middle weight verbatim beyond the kept blocks, that the
plug-in of an adapter trained against them equals PEFT loading, and that builds are cached by every setting."""

import pytest
import torch
from peft import PeftModel

from cloud.store import emulators as store_module
from cloud.store.emulators import EmulatorSpec, EmulatorStore, emulator_key, model_fingerprint
from edge.modes.split import LocalMiddle, split_step
from emulator.adapters.lora import (
    LoraSettings,
    adapter_state_dict,
    add_lora,
    lora_parameters,
    peft_config,
    save_adapter,
)
from emulator.adapters.plugin import plug_in
from emulator.data.datasets import IGNORE
from emulator.model.arch import arch_for
from emulator.model.bundle import load_emulator, read_plan, write_bundle
from emulator.model.loading import load_causal_lm, load_tokenizer
from emulator.model.segments import plan_for, run_blocks, split_causal_lm
from emulator.offsite.distill import DistillSettings
from emulator.offsite.select import (
    bridged_emulator,
    bridged_order,
    contiguous_clusters,
    linear_cka,
    representatives,
    shared_emulator,
    top_positions,
)
from emulator.offsite.stack import unique_parameters
from protocol.accounting import Traffic
from tests.conftest import FAMILIES
from tests.emulator.test_offsite_bundle import verbatim_middle_blocks

IDS = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
DISTILL = DistillSettings(steps=2, batch_size=2, seq_len=16, warmup_steps=1)
CONSTRUCTIONS = {
    "importance+bridges": dict(selection="importance", bridge_rank=4, distill=DISTILL),
    "crash": dict(selection="crash"),
    "uniform+bridges": dict(selection="uniform", bridge_rank=4, distill=DISTILL),
}


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "cloud-text.txt"
    path.write_text("\n\n".join(f"The cloud owns passage number {i}, about films and weather and trains."
                                for i in range(60)))
    return str(path)


def test_top_positions_keeps_the_highest_in_order():
    assert top_positions([0.1, 3.0, 0.2, 2.0, 0.05], 2) == [1, 3]


def test_bridged_order_replaces_each_dropped_run_by_one_bridge():
    assert bridged_order([2, 3, 4, 5, 6, 7], [3, 6]) == ["b2", "3", "b4", "6", "b7"]


def test_contiguous_clusters_merge_the_most_similar_neighbours():
    sim = [[1.0, 0.9, 0.1, 0.1], [0.9, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.8], [0.1, 0.1, 0.8, 1.0]]
    clusters = contiguous_clusters(sim, 2)
    assert clusters == [[0, 1], [2, 3]]
    assert representatives(sim, clusters) == [0, 2]  # ties go to the earliest member


def test_linear_cka_is_one_for_a_rotation_and_small_for_noise():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(200, 8, generator=torch.Generator().manual_seed(2))) < 0.2


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_emulator_runs_each_kept_block_once_per_cluster_member(family, tiny_dirs):
    split = split_causal_lm(load_causal_lm(tiny_dirs[family]), 1)  # middle: blocks 1..4
    emulator = shared_emulator(split.middle, [[0, 1, 2], [3]], [1, 3])
    assert emulator.indices == [2, 4] and emulator.order == ["2", "2", "2", "4"]
    assert unique_parameters(emulator) * 2 == unique_parameters(split.middle)
    hidden = torch.randn(2, 5, 32)
    blocks = [split.middle.layers["2"]] * 3 + [split.middle.layers["4"]]
    reference = run_blocks(blocks, hidden, split.middle.spec, split.middle.rotary)
    torch.testing.assert_close(emulator(hidden), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_bridges_equal_the_kept_blocks_alone(family, tiny_dirs):
    split = split_causal_lm(load_causal_lm(tiny_dirs[family]), 1)
    bridged = bridged_emulator(split.middle, [1, 3], 32, 4)
    plain = bridged_emulator(split.middle, [1, 3], 32, 0)
    assert bridged.order == ["b1", "2", "b3", "4"] and plain.indices == [2, 4]
    hidden = torch.randn(2, 5, 32)
    torch.testing.assert_close(bridged(hidden), plain(hidden))
    assert unique_parameters(bridged) == unique_parameters(plain) + 2 * (2 * 32 * 4)


def _adapter_trained_against(edge, emulator, spec, directory):
    """Two LoRA steps of the edge against the emulator; saves a PEFT adapter."""
    settings = LoraSettings(rank=4, alpha=8, targets=("all",))
    torch.manual_seed(0)
    model = add_lora(edge, settings, spec)
    params = list(lora_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=0.5)
    labels = IDS.clone()
    labels[:, :4] = IGNORE
    for step in (1, 2):
        split_step(model, LocalMiddle(emulator), step, IDS, labels, Traffic())
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(directory, adapter_state_dict(model, spec), peft_config(model, settings, spec, "tiny"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
def test_construction_bundle_plug_in_and_cache(family, construction, tiny_dirs, corpus, tmp_path):
    model_dir = tiny_dirs[family]
    model, fp = load_causal_lm(model_dir).requires_grad_(False), model_fingerprint(model_dir)
    store = EmulatorStore(tmp_path / "store")
    spec = EmulatorSpec(1, 2, distill_data=corpus, **CONSTRUCTIONS[construction])
    stored = store.build(model, "tiny", fp, spec, load_tokenizer(model_dir), progress=False)
    emulator = stored.load(model)
    plan = plan_for(model.config, 1)
    middle_params = unique_parameters(split_causal_lm(model, 1).middle)
    assert stored.meta["unique_share"] == pytest.approx(unique_parameters(emulator) / middle_params)
    assert stored.meta["unique_share"] < 0.75  # E=2 of a middle of 4 (+ small bridges)
    # The bundle: no middle weight verbatim beyond the kept blocks (distilled ones: none at all).
    bundle = write_bundle(model, model_dir, plan, tmp_path / "bundles", "tiny", emulator, stored.public_meta())
    found = verbatim_middle_blocks(bundle, model, plan)
    assert found <= set(stored.blocks) and len(found) <= 2
    if spec.distill is not None:
        assert found == set()
    restored = load_emulator(bundle)
    hidden = torch.randn(2, 5, 32)
    torch.testing.assert_close(restored(hidden), emulator(hidden))
    assert read_plan(bundle)[1]["emulator"]["order"] == stored.meta["order"]
    # Plug-in of an adapter trained against this emulator equals PEFT loading.
    split = split_causal_lm(model, 1)
    _adapter_trained_against(split.edge, restored, arch_for(model.config), tmp_path / "adapter")
    with torch.no_grad():
        merged = plug_in(model, tmp_path / "adapter")(IDS).logits
        peft = PeftModel.from_pretrained(load_causal_lm(model_dir), str(tmp_path / "adapter")).eval()(IDS).logits
    torch.testing.assert_close(merged, peft, rtol=1e-4, atol=1e-5)
    # Cached by every setting: the same spec is reused, each changed setting is a new entry.
    again = store.build(model, "tiny", fp, spec, load_tokenizer(model_dir), progress=False)
    assert again.key == stored.key and again.meta["built"] == stored.meta["built"]
    other = EmulatorSpec(1, 1, distill_data=corpus, **CONSTRUCTIONS[construction])
    assert store.build(model, "tiny", fp, other, load_tokenizer(model_dir), progress=False).key != stored.key
    assert len(store.list()) == 2


def test_every_setting_is_in_the_cache_key(corpus):
    base = EmulatorSpec(1, 2, distill=DISTILL, distill_data=corpus, selection="importance", bridge_rank=4)
    variants = [EmulatorSpec(1, 2, distill=DISTILL, distill_data=corpus, selection="importance", bridge_rank=8),
                EmulatorSpec(1, 2, distill=DISTILL, distill_data=corpus, selection="uniform", bridge_rank=4),
                EmulatorSpec(1, 3, distill=DISTILL, distill_data=corpus, selection="importance", bridge_rank=4),
                EmulatorSpec(1, 2, distill=DistillSettings(steps=3, batch_size=2, seq_len=16, warmup_steps=1),
                             distill_data=corpus, selection="importance", bridge_rank=4),
                EmulatorSpec(1, 2, distill=DistillSettings(steps=2, batch_size=2, seq_len=16, warmup_steps=1,
                                                           hidden_weight=30.0),
                             distill_data=corpus, selection="importance", bridge_rank=4)]
    keys = {emulator_key("fp", s) for s in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert emulator_key("fp", EmulatorSpec(1, 2, selection="crash", distill_data=corpus)) != emulator_key(
        "fp", EmulatorSpec(1, 2, selection="crash"))


def test_selection_measurements_are_reused_on_resume(tiny_dirs, corpus, tmp_path, monkeypatch):
    model_dir = tiny_dirs["llama"]
    model = load_causal_lm(model_dir).requires_grad_(False)
    spec = EmulatorSpec(1, 2, distill_data=corpus, selection="importance")
    checkpoint = tmp_path / "em.partial"
    first, meta = store_module.build_emulator(model, spec, load_tokenizer(model_dir), checkpoint, progress=False)
    monkeypatch.setattr(store_module, "drop_one_importance", lambda *a: pytest.fail("measured again"))
    second, again = store_module.build_emulator(model, spec, load_tokenizer(model_dir), checkpoint, progress=False)
    assert again["importance"] == meta["importance"] and second.indices == first.indices


def test_bad_construction_settings_are_all_reported():
    problems = EmulatorSpec(1, 2, selection="random", bridge_rank=-1).problems()
    assert any("--selection random" in p for p in problems) and any("--bridge-rank -1" in p for p in problems)
    assert any("needs" in p or "trained by distillation" in p for p in EmulatorSpec(1, 2, bridge_rank=4).problems())


def test_measurements_are_shared_by_builds_of_other_depths(tiny_dirs, corpus, tmp_path, monkeypatch):
    model_dir = tiny_dirs["opt"]
    model, fp = load_causal_lm(model_dir).requires_grad_(False), model_fingerprint(model_dir)
    store = EmulatorStore(tmp_path / "store")
    first = store.build(model, "tiny", fp, EmulatorSpec(1, 2, distill_data=corpus, selection="importance"),
                        load_tokenizer(model_dir), progress=False)
    monkeypatch.setattr(store_module, "drop_one_importance", lambda *a: pytest.fail("measured again"))
    second = store.build(model, "tiny", fp, EmulatorSpec(1, 1, distill_data=corpus, selection="importance"),
                         load_tokenizer(model_dir), progress=False)
    assert second.meta["importance"] == first.meta["importance"] and second.key != first.key
    top = max(range(4), key=lambda i: first.meta["importance"][i])
    assert second.blocks == [first.meta["middle_blocks"][top]]  # E=1 keeps the single most important block
