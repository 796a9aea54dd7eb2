"""``edgetune-edge``: every user mistake is one line and exit 2 (checked before connecting), --help shows
defaults and help text, and the module imports without torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from edge import cli
from tests.conftest import REPO

# Nothing listens on port 1: a case that reached the network would fail differently (and slowly).
NOWHERE = "127.0.0.1:1"


@pytest.fixture
def files(tmp_path, pki):
    """Good and bad inputs of every kind, by name."""
    good_train, good_eval = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    good_train.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    good_eval.write_text(json.dumps({"prompt": "a", "choices": [" b", " c"], "answer": 0}) + "\n")
    (tmp_path / "notjson.jsonl").write_text("{not json\n")
    (tmp_path / "wrongkeys.jsonl").write_text(json.dumps({"question": "a"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "badanswer.jsonl").write_text(json.dumps({"prompt": "a", "choices": [" b"], "answer": 3}) + "\n")
    run = tmp_path / "oldrun"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    (tmp_path / "emptyid").mkdir()
    notpem = tmp_path / "notpem"
    notpem.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (notpem / name).write_text("hello")
    (tmp_path / "afile").write_text("x")
    badadapter = tmp_path / "badadapter"
    badadapter.mkdir()
    (badadapter / "adapter_config.json").write_text("{oops")
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    badweights = tmp_path / "badweights"
    badweights.mkdir()
    (badweights / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (badweights / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    damaged = tmp_path / "damagedid"
    damaged.mkdir()
    for name in ("ca.crt", "client.crt", "client.key"):
        (damaged / name).write_bytes((pki / "clients" / "alice" / name).read_bytes())
    (damaged / "client.crt").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    return {"dir": tmp_path, "id": str(pki / "clients" / "alice"), "train": str(good_train), "eval": str(good_eval)}


def bad_train(f):
    d, base = f["dir"], ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", f["train"]]
    out = ["--out", str(d / "new")]
    return {
        "unknown flag": [*base, *out, "--bogus"],
        "non-integer steps": [*base, *out, "--steps", "many"],
        "bad mode": [*base, *out, "--mode", "federated"],
        "zero steps": [*base, *out, "--steps", "0"],
        "negative lr": [*base, *out, "--lr", "-1"],
        "no out": base,
        "cloud without port": ["train", "--cloud", "cloudhost", "--identity", f["id"], "--data", f["train"], *out],
        "cloud port out of range": ["train", "--cloud", "h:70000", "--identity", f["id"], "--data", f["train"], *out],
        "missing data": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", str(d / "nope"), *out],
        "data not json": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", str(d / "notjson.jsonl"),
                          *out],
        "data wrong keys": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data",
                            str(d / "wrongkeys.jsonl"), *out],
        "data empty": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", str(d / "empty.jsonl"), *out],
        "data binary": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", str(d / "binary.jsonl"), *out],
        "data is a directory": ["train", "--cloud", NOWHERE, "--identity", f["id"], "--data", str(d), *out],
        "eval bad answer": [*base, *out, "--eval", str(d / "badanswer.jsonl")],
        "eval missing": [*base, *out, "--eval", str(d / "nope.jsonl")],
        "identity missing": ["train", "--cloud", NOWHERE, "--identity", str(d / "nope"), "--data", f["train"], *out],
        "identity empty": ["train", "--cloud", NOWHERE, "--identity", str(d / "emptyid"), "--data", f["train"], *out],
        "identity not pem": ["train", "--cloud", NOWHERE, "--identity", str(d / "notpem"), "--data", f["train"],
                             *out],
        "out holds a run": [*base, "--out", str(d / "oldrun")],
        "out is a file": [*base, "--out", str(d / "afile")],
        "resume and other out": [*base, "--resume", str(d / "oldrun"), "--out", str(d / "new")],
        "resume and force": [*base, "--resume", str(d / "oldrun"), "--force"],
        "resume without checkpoint": [*base, "--resume", str(d / "oldrun")],
        "unknown lora target": [*base, *out, "--lora-targets", "foo_proj"],
        "all mixed with names": [*base, *out, "--lora-targets", "all,q_proj"],
        "unknown schedule": [*base, *out, "--schedule", "zigzag"],
        "negative threads": [*base, *out, "--threads", "-2"],
        "kr outside dlora": [*base, *out, "--kr-budget", "0.5"],
        "kr budget above one": [*base, *out, "--mode", "dlora", "--kr-budget", "1.5"],
        "tune full outside offsite": [*base, *out, "--tune", "full"],
        "tune lora-top outside offsite": [*base, *out, "--tune", "lora-top"],
        "lora-top in federated rounds": [*base, *out, "--mode", "offsite", "--tune", "lora-top", "--federated"],
        "bad wire dtype": [*base, *out, "--wire-dtype", "int4"],
    }


def bad_other(f):
    d, conn = f["dir"], ["--cloud", NOWHERE, "--identity", f["id"]]
    return {
        "no command": [],
        "unknown command": ["fly"],
        "eval missing data": ["eval", *conn, "--data", str(d / "nope.jsonl")],
        "eval data wrong format": ["eval", *conn, "--data", f["train"]],
        "eval bad cloud": ["eval", "--cloud", "nohost", "--identity", f["id"], "--data", f["eval"]],
        "eval adapter missing": ["eval", *conn, "--data", f["eval"], "--adapter", str(d / "nope")],
        "eval adapter config broken": ["eval", *conn, "--data", f["eval"], "--adapter", str(d / "badadapter")],
        "eval adapter without config": ["eval", *conn, "--data", f["eval"], "--adapter", str(d / "noconfig")],
        "eval adapter weights damaged": ["eval", *conn, "--data", f["eval"], "--adapter", str(d / "badweights")],
        "list identity damaged": ["list", "--cloud", NOWHERE, "--identity", str(d / "damagedid")],
        "eval dlora without adapter": ["eval", *conn, "--data", f["eval"], "--mode", "dlora"],
        "eval zero batch": ["eval", *conn, "--data", f["eval"], "--eval-batch", "0"],
        "list bad cloud": ["list", "--cloud", "h:port", "--identity", f["id"]],
        "list identity missing": ["list", "--cloud", NOWHERE, "--identity", str(d / "nope")],
        "pull existing out": ["pull", *conn, "--adapter", "ad-1", "--out", str(d / "oldrun")],
        "pull out under a file": ["pull", *conn, "--adapter", "ad-1", "--out", str(d / "afile" / "x")],
        "pull identity not pem": ["pull", "--cloud", NOWHERE, "--identity", str(d / "notpem"), "--adapter", "a",
                                  "--out", str(d / "x")],
        "base-model unknown": ["base-model", "--model", "gpt-17", "--out", str(d / "bm")],
        "base-model dir without config": ["base-model", "--model", str(d / "emptyid"), "--out", str(d / "bm")],
        "base-model existing out": ["base-model", "--model", str(d / "emptyid"), "--out", str(d / "oldrun")],
    }


def run_main(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as err:  # argparse
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code, err, name):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
    assert lines[0].startswith("edgetune-edge"), f"{name}: {err!r}"


def test_every_bad_input_is_one_line_and_exit_2(files, capsys):
    cases = {**bad_train(files), **bad_other(files)}
    for name, argv in cases.items():
        code, _, err = run_main(argv, capsys)
        assert_one_line(code, err, name)
    assert not (files["dir"] / "new").exists()  # nothing was created by a refused run
    assert (files["dir"] / "oldrun" / "metrics.json").read_text() == "{}"  # nor an old one touched


def test_messages_name_the_input_and_the_fix(files, capsys):
    d = files["dir"]
    expect = {
        "out holds a run": ("--out", "--resume", "--force"),
        "resume and other out": ("--resume", "drop --out"),
        "unknown lora target": ("--lora-targets", "foo_proj", "q_proj"),
        "cloud without port": ("--cloud", "HOST:PORT"),
    }
    cases = bad_train(files)
    for name, words in expect.items():
        _, _, err = run_main(cases[name], capsys)
        assert all(w in err for w in words), f"{name}: {err!r}"
    _, _, err = run_main(bad_other(files)["pull existing out"], capsys)
    assert str(d / "oldrun") in err and "already exists" in err


def test_resuming_a_finished_run_registers_nothing(files, capsys):
    run = files["dir"] / "finished"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"adapter_id": "ad-123"}))
    # The cloud address is unreachable: the run must end before any connection is attempted.
    code, out, err = run_main(["train", "--cloud", NOWHERE, "--identity", files["id"], "--data", files["train"],
                               "--resume", run], capsys)
    assert code == 0 and "ad-123" in out and "nothing to resume" in out, err


def test_run_dir_convention(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.run_dir(empty, None, False) == empty  # an empty directory is a new run
    assert cli.run_dir(tmp_path / "new", None, False) == tmp_path / "new"
    assert cli.run_dir(None, tmp_path, False) == tmp_path
    assert cli.run_dir(tmp_path, tmp_path, False) == tmp_path  # the same directory twice is not a conflict
    assert cli.run_dir(tmp_path, None, True) == tmp_path  # --force
    with pytest.raises(cli.UsageError):
        cli.run_dir(tmp_path, None, False)


def test_dlora_defaults_fit_short_runs(files):
    def cfg(*extra):
        args = cli.build_parser().parse_args(["train", "--cloud", NOWHERE, "--identity", files["id"], "--data",
                                              files["train"], "--out", str(files["dir"] / "x"), *extra])
        return cli._train_config(args, args.out, ())

    assert (cfg("--mode", "dlora", "--steps", "25").lr, cfg("--mode", "dlora", "--steps", "25").warmup_steps) == (
        1e-3, 2)
    assert cfg("--mode", "dlora", "--steps", "500").warmup_steps == 20
    assert (cfg("--mode", "split").lr, cfg("--mode", "split").warmup_steps) == (2e-4, 20)
    assert (cfg("--mode", "dlora", "--lr", "5e-4", "--warmup-steps", "7").lr,
            cfg("--mode", "dlora", "--lr", "5e-4", "--warmup-steps", "7").warmup_steps) == (5e-4, 7)


def test_offsite_trains_the_top_lora_by_default_and_federated_rounds_both_ends(files):
    def tune(*extra):
        args = cli.build_parser().parse_args(["train", "--cloud", NOWHERE, "--identity", files["id"], "--data",
                                              files["train"], "--out", str(files["dir"] / "x"), *extra])
        return cli._train_config(args, args.out, ()).tune

    # docs/offsite_benchmark.md: lora-top has the best mean plug-in and the fastest, leanest edge run
    assert tune("--mode", "offsite") == "lora-top"
    assert tune("--mode", "offsite", "--federated") == "lora"  # FedAvg averages both adapter ends
    assert tune("--mode", "offsite", "--tune", "lora") == "lora"
    assert tune("--mode", "split") == tune("--mode", "dlora") == "lora"


def test_restated_defaults_match_the_config_classes():
    from edge.training.recipes import TUNES, WIRE_CHOICES, TrainConfig
    from emulator.adapters.lora import LoraSettings
    from emulator.model.loading import COMPUTE_DTYPES
    from protocol.types import MODES

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: fields[k] for k in cli.TRAIN_DEFAULTS} == cli.TRAIN_DEFAULTS
    assert (cli.LORA_RANK, cli.LORA_ALPHA) == (LoraSettings.rank, LoraSettings.alpha)
    assert (cli.MODES, cli.TUNES, set(cli.WIRE_CHOICES)) == (MODES, TUNES, set(WIRE_CHOICES))
    assert set(cli.COMPUTE_CHOICES) <= set(COMPUTE_DTYPES)
    defaults = {a.dest: a.default for a in subparsers(cli.build_parser())["train"]._actions}
    for name, value in defaults.items():  # every flag the config classes also know
        if name.startswith("defence_"):
            from emulator.privacy.defence import DefenceSettings

            assert value == getattr(DefenceSettings, name.removeprefix("defence_")), name


def subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (nested) sub-command parser by its command path."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(subparsers(sub, f"{prefix}{name} "))
    return found


def assert_help_everywhere(parser: argparse.ArgumentParser) -> None:
    subs = subparsers(parser)
    assert subs
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
        text = sub.format_help()
        for action in sub._actions:
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if shown and "default:" not in (action.help or ""):
                assert f"(default: {action.default})" in " ".join(text.split()), f"{name} {action.dest}"


def test_every_option_has_help_and_shows_its_default():
    assert_help_everywhere(cli.build_parser())


def test_importing_the_clis_loads_no_heavy_library():
    code = ("import sys, edge.cli, cloud.cli; heavy = [m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--bogus"], ["pull", "--cloud", "x"]])
def test_help_and_argument_errors_as_a_real_process(argv):
    proc = subprocess.run([sys.executable, "-m", "edge.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    if argv == ["--help"]:
        assert proc.returncode == 0 and "base-model" in proc.stdout
    else:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_base_model_writes_a_directory_peft_loads_adapters_on(tiny_dirs, tmp_path, capsys):
    """The README's data-owner steps on a tiny model: write the base model, load a PEFT adapter on it."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "base"
    code, stdout, err = run_main(["base-model", "--model", tiny_dirs["llama"], "--out", out], capsys)
    assert code == 0, err
    assert str(out) in stdout
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                             LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    trained.save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids).logits, trained(ids).logits)
    code, _, err = run_main(["base-model", "--model", tiny_dirs["llama"], "--out", out], capsys)
    assert code == 2 and "already exists" in err  # never overwritten
