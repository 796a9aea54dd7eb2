"""``edgetune-edge`` against a real coordinator: runs and pulls are never replaced silently, adapters of
another mode or model are one line, and offsite warns about an undistilled emulator."""

import json

import pytest

from edge import cli
from tests.tiny_models import write_toy_sentiment

pytestmark = pytest.mark.integration


def run_main(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as err:
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err):
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
             and "row/s]" not in line and "step/s]" not in line and "s/it]" not in line]
    return code == 2 and len(lines) == 1 and "Traceback" not in err and lines[0].startswith("edgetune-edge")


@pytest.fixture(scope="module")
def setup(tiny_cloud, pki, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-runs")
    train, held_out = write_toy_sentiment(root)
    conn = ["--cloud", tiny_cloud.address, "--identity", pki / "clients" / "alice"]
    small = ["--steps", "2", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--no-eval-before",
             "--checkpoint-every", "1"]
    return {"root": root, "conn": conn, "train": [*conn, "--data", train, *small], "eval": held_out}


def adapter_ids(setup, capsys):
    code, out, err = run_main(["list", *setup["conn"]], capsys)
    assert code == 0, err
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def split_run(setup):
    run = setup["root"] / "split-run"
    assert cli.main([str(a) for a in ["train", *setup["train"], "--out", run]]) == 0
    return run


@pytest.fixture(scope="module")
def dlora_run(setup):
    run = setup["root"] / "dlora-run"
    assert cli.main([str(a) for a in ["train", *setup["train"], "--mode", "dlora", "--out", run]]) == 0
    return run


def test_a_run_is_never_replaced_and_a_finished_resume_registers_nothing(setup, split_run, capsys):
    first = json.loads((split_run / "metrics.json").read_text())["adapter_id"]
    before = adapter_ids(setup, capsys)
    assert first in before
    code, _, err = run_main(["train", *setup["train"], "--out", split_run], capsys)
    assert one_line(code, err) and "--resume" in err and "--force" in err
    code, out, err = run_main(["train", *setup["train"], "--resume", split_run], capsys)
    assert code == 0 and first in out and "nothing to resume" in out, err
    assert adapter_ids(setup, capsys) == before  # nothing registered
    assert json.loads((split_run / "metrics.json").read_text())["adapter_id"] == first
    code, _, err = run_main(["train", *setup["train"], "--resume", split_run, "--out", setup["root"] / "other"],
                            capsys)
    assert one_line(code, err) and not (setup["root"] / "other").exists()
    forced = setup["root"] / "forced"
    forced.mkdir()
    (forced / "stale.txt").write_text("old")
    code, _, err = run_main(["train", *setup["train"], "--out", forced, "--force"], capsys)
    assert code == 0, err
    assert not (forced / "stale.txt").exists()
    assert json.loads((forced / "metrics.json").read_text())["adapter_id"] not in before


def test_adapters_of_another_mode_or_model_are_one_line(setup, split_run, dlora_run, capsys):
    base = ["eval", *setup["conn"], "--data", setup["eval"]]
    code, out, err = run_main([*base, "--adapter", split_run / "adapter"], capsys)
    assert code == 0 and "eval_accuracy" in out, err  # the right mode works
    code, _, err = run_main([*base, "--mode", "dlora", "--adapter", split_run / "adapter"], capsys)
    assert one_line(code, err) and "--mode dlora" in err, err
    code, _, err = run_main([*base, "--mode", "split", "--adapter", dlora_run / "adapter"], capsys)
    assert one_line(code, err) and "--mode split" in err, err
    code, _, err = run_main([*base, "--mode", "offsite", "--adapter", dlora_run / "adapter"], capsys)
    assert one_line(code, err) and "--mode offsite" in err, err
    other = setup["root"] / "other-model"
    other.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (other / name).write_bytes((split_run / "adapter" / name).read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gpt-17"}))
    code, _, err = run_main([*base, "--adapter", other], capsys)
    assert one_line(code, err) and "gpt-17" in err, err


def test_targets_of_another_family_are_one_line_after_connecting(setup, capsys):
    run = setup["root"] / "gpt2-targets"
    code, _, err = run_main(["train", *setup["train"], "--out", run, "--lora-targets", "c_attn"], capsys)
    assert one_line(code, err) and "c_attn" in err, err
    assert not (run / "adapter").exists()


def test_pull_never_overwrites_and_a_failed_pull_leaves_nothing(setup, split_run, capsys):
    adapter = json.loads((split_run / "metrics.json").read_text())["adapter_id"]
    target = setup["root"] / "pulled"
    code, _, err = run_main(["pull", *setup["conn"], "--adapter", "ad-000000000000", "--out", target], capsys)
    assert one_line(code, err), err
    assert not target.exists() and not list(setup["root"].glob(".tmp-*"))
    code, _, err = run_main(["pull", *setup["conn"], "--adapter", adapter, "--out", target], capsys)
    assert code == 0, err
    assert (target / "adapter_model.safetensors").read_bytes() == (
        split_run / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = run_main(["pull", *setup["conn"], "--adapter", adapter, "--out", target], capsys)
    assert one_line(code, err) and "already exists" in err


def test_offsite_warns_once_about_an_undistilled_emulator(setup, capsys, monkeypatch):
    from edge.modes import offsite

    seen = []

    def layer_drop_only(meta):  # the served emulator is whatever serve's default is: warn as if it were layer drop
        seen.append(meta)
        return True

    monkeypatch.setattr(offsite, "layer_drop_only", layer_drop_only)
    run = setup["root"] / "offsite"
    code, _, err = run_main(["train", *setup["train"], "--mode", "offsite", "--out", run], capsys)
    assert code == 0, err
    assert seen == [json.loads((run / "metrics.json").read_text())["emulator"]]  # asked once, about the bundle's
    warnings = [line for line in err.splitlines() if "not distilled" in line]
    assert len(warnings) == 1 and "emulator build" in warnings[0], err


def test_which_emulators_warn():
    from edge.modes.offsite import layer_drop_only

    assert layer_drop_only({"distilled": False, "selection": "uniform", "bridge_rank": 0})
    assert layer_drop_only({"distilled": False})  # bundles from before block selection existed
    assert not layer_drop_only({"distilled": True, "selection": "uniform"})
    assert not layer_drop_only({"distilled": False, "selection": "importance"})
    assert not layer_drop_only({"distilled": False, "selection": "uniform", "bridge_rank": 4})
