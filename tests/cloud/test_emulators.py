"""The emulator store: cached by model and settings, distilled preferred, and too-deep emulators refused."""

import pytest

from cloud.cli import main as cloud_main
from cloud.errors import InvalidArgument
from cloud.rpc.handlers import Coordinator
from cloud.store.emulators import EmulatorSpec, EmulatorStore, emulator_key, model_fingerprint
from emulator.model.loading import load_causal_lm, load_tokenizer
from emulator.offsite.distill import DistillSettings
from protocol.types import OpenSessionRequest


def test_cli_refuses_an_emulator_as_deep_as_the_middle(tiny_dirs, tmp_path, capsys):
    code = cloud_main(["emulator", "build", "--model", str(tiny_dirs["llama"]), "--store", str(tmp_path),
                       "--edge-layers", "1", "--emulator-layers", "4"])
    assert code == 2
    assert "--emulator-layers 4: an emulator must have 1..3 blocks" in capsys.readouterr().err
    assert not (tmp_path / "emulators").exists() or not any((tmp_path / "emulators").iterdir())


def test_cli_builds_the_default_emulator(tiny_dirs, tmp_path, capsys):
    """The command serve and the demo rely on: the default (corpus-measured) construction builds."""
    code = cloud_main(["emulator", "build", "--model", str(tiny_dirs["llama"]), "--store", str(tmp_path),
                       "--edge-layers", "1", "--emulator-layers", "2", "--selection", "importance"])
    assert code == 0, capsys.readouterr().err
    stored = EmulatorStore(tmp_path).find(model_fingerprint(tiny_dirs["llama"]), 1, 2)
    assert stored is not None and stored.meta["selection"] == "importance"


def test_builds_are_cached_by_model_and_settings(tiny_dirs, tmp_path):
    model, fp = load_causal_lm(tiny_dirs["llama"]), model_fingerprint(tiny_dirs["llama"])
    store = EmulatorStore(tmp_path)
    drop = store.build(model, "tiny", fp, EmulatorSpec(1, 2))
    again = store.build(model, "tiny", fp, EmulatorSpec(1, 2))
    assert again.key == drop.key and again.meta["built"] == drop.meta["built"]
    assert emulator_key(fp, EmulatorSpec(1, 2)) != emulator_key(fp, EmulatorSpec(1, 2, sparsity=0.5))
    assert emulator_key(fp, EmulatorSpec(1, 2)) != emulator_key("other-model", EmulatorSpec(1, 2))
    assert store.find(fp, 1, 2).key == drop.key and not drop.distilled
    spec = EmulatorSpec(1, 2, distill=DistillSettings(steps=2, batch_size=2, seq_len=16, warmup_steps=1))
    distilled = store.build(model, "tiny", fp, spec, load_tokenizer(tiny_dirs["llama"]), progress=False)
    assert distilled.distilled and distilled.meta["kd_after"]["total"] > 0
    assert store.find(fp, 1, 2).key == distilled.key  # distilled preferred over layer-drop-only
    assert store.find(fp, 1, 3) is None


def test_offsite_sessions_use_the_stored_emulator_and_refuse_bad_depths(tiny_dirs, tmp_path):
    model = load_causal_lm(tiny_dirs["llama"]).requires_grad_(False)
    coordinator = Coordinator("tiny", tiny_dirs["llama"], model, tmp_path, default_edge_layers=1)
    info = coordinator.open_session("alice", OpenSessionRequest("offsite", 1, emulator_layers=3)).model
    assert info.emulator_layers == 3 and not info.emulator_distilled
    assert info.bundle_id != coordinator.open_session("alice", OpenSessionRequest("split", 1)).model.bundle_id
    with pytest.raises(InvalidArgument, match="fewer than the 4 middle blocks"):
        coordinator.open_session("alice", OpenSessionRequest("offsite", 1, emulator_layers=4))
    assert coordinator.open_session("alice", OpenSessionRequest("offsite", 1)).model.emulator_layers == 1
    coordinator.registry.close()
