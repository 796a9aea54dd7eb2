"""``edgetune-cloud``: every user mistake is one line and exit 2, ``adapters list`` shows the store,
--help shows defaults and help text."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from cloud import cli
from cloud.store.registry import AdapterRegistry, staging_dir
from protocol.types import AdapterMeta
from tests.edge.test_cli import assert_help_everywhere


def run_main(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as err:  # argparse
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stage_lora(store, rank=2):
    """A minimal valid PEFT LoRA upload in the store's staging area."""
    import torch
    from safetensors.torch import save_file

    staged = staging_dir(store)
    (staged / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(rank, 4)},
              str(staged / "adapter_model.safetensors"))
    return staged


@pytest.fixture
def store(tmp_path):
    """A store with two adapters of two owners, as ``serve`` leaves it."""
    directory = tmp_path / "store"
    registry = AdapterRegistry(directory)
    registry.add("alice", AdapterMeta(mode="split", base_model="smollm2-135m"), stage_lora(directory))
    registry.add("bob", AdapterMeta(mode="dlora", base_model="tiny"), stage_lora(directory, rank=4))
    registry.close()
    return directory


def test_adapters_list_shows_every_adapter_of_every_owner(store, capsys):
    registry = AdapterRegistry(store)
    expected = registry.list_all()
    registry.close()
    assert sorted(m.owner for m in expected) == ["alice", "bob"]
    code, out, err = run_main(["adapters", "list", "--store", store], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ADAPTER", "OWNER", "MODE", "BASE", "MODEL", "BYTES", "CREATED", "(UTC)"]
    for meta, line in zip(expected, lines[1:3]):
        assert line.split() == [meta.adapter_id, meta.owner, meta.mode, meta.base_model, str(meta.size_bytes),
                                meta.created]
        sizes = sum(p.stat().st_size for p in (store / "adapters" / meta.adapter_id).iterdir())
        assert 0 < meta.size_bytes < sizes  # plaintext bytes; the stored files carry nonce and tag on top
    assert lines[3] == f"2 adapter(s) in {store}"
    code, out, _ = run_main(["adapters", "list", "--store", store, "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [{k: v for k, v in dataclasses.asdict(m).items()
                     if k in ("adapter_id", "owner", "mode", "base_model", "size_bytes", "created")} for m in expected]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", r["created"]) for r in rows)


def bad_inputs(tmp_path, pki, store, model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    damaged = tmp_path / "damagedpki"
    damaged.mkdir()
    for name in ("ca.crt", "server.crt", "server.key"):
        (damaged / name).write_bytes((pki / name).read_bytes())
    (damaged / "server.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "a", "choices": [" b", " c"], "answer": 0}) + "\n")
    serve = ["serve", "--model", model, "--pki", pki, "--store", tmp_path / "s", "--listen", "127.0.0.1:0"]
    return {
        "no command": [],
        "unknown flag": ["serve", "--pki", pki, "--store", store, "--bogus"],
        "non-integer workers": ["serve", "--pki", pki, "--store", store, "--workers", "many"],
        "pki init over a CA": ["pki", "init", pki],
        "pki init no hosts": ["pki", "init", tmp_path / "p2", "--hosts", ","],
        "pki issue without CA": ["pki", "issue", tmp_path / "nope", "carol"],
        "pki issue bad name": ["pki", "issue", pki, "../carol"],
        "pki issue twice": ["pki", "issue", pki, "alice"],
        "pki issue zero days": ["pki", "issue", pki, "dave", "--days", "0"],
        "pki revoke unknown": ["pki", "revoke", pki, "zed"],
        "serve key damaged": ["serve", "--model", model, "--pki", damaged, "--store", tmp_path / "s", "--listen",
                              "127.0.0.1:0"],
        "serve pki missing": ["serve", "--model", model, "--pki", tmp_path / "nope", "--store", tmp_path / "s"],
        "serve listen without port": [*serve, "--listen", "localhost"],
        "serve listen foreign host": [*serve, "--listen", "192.0.2.1:50051"],
        "serve listen unresolvable": [*serve, "--listen", "no-such-host.invalid:50051"],
        "serve zero workers": [*serve, "--workers", "0"],
        "serve bad model": ["serve", "--model", "gpt-17", "--pki", pki, "--store", tmp_path / "s", "--listen",
                            "127.0.0.1:0"],
        "serve store is a file": ["serve", "--model", model, "--pki", pki, "--store", afile, "--listen", "127.0.0.1:0"],
        "evaluate no store": ["evaluate", "--store", tmp_path / "nope", "--adapter", "ad-1", "--data", data],
        "evaluate unknown adapter": ["evaluate", "--model", model, "--store", store, "--adapter", "ad-1",
                                     "--data", data],
        "evaluate missing data": ["evaluate", "--model", model, "--store", store, "--adapter", "ad-1", "--data",
                                  tmp_path / "nope.jsonl"],
        "export existing out": ["export", "--model", model, "--store", store, "--adapter", "ad-1", "--out", store],
        "export unknown adapter": ["export", "--model", model, "--store", store, "--adapter", "ad-1", "--out",
                                   tmp_path / "merged"],
        "adapters list no store": ["adapters", "list", "--store", tmp_path / "nope"],
        "adapters list not a store": ["adapters", "list", "--store", pki],
        "emulator list no store": ["emulator", "list", "--store", tmp_path / "nope"],
        "emulator build too deep": ["emulator", "build", "--model", model, "--store", store, "--emulator-layers",
                                    "99"],
        "emulator build bad corpus": ["emulator", "build", "--model", model, "--store", store, "--emulator-layers",
                                      "1", "--distill-data", tmp_path / "nope.txt", "--distill-steps", "1"],
    }


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, pki, store, tiny_dirs, capsys):
    for name, argv in bad_inputs(tmp_path, pki, store, tiny_dirs["llama"]).items():
        code, _, err = run_main(argv, capsys)
        # progress bars (model loading) and log lines are not error output
        lines = [line for line in err.replace("\r", "\n").splitlines()
                 if line.strip() and " INFO " not in line and "it/s]" not in line]
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
        assert lines[0].startswith("edgetune-cloud"), f"{name}: {err!r}"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "nope").exists()  # read-only commands create nothing


def test_every_option_has_help_and_shows_its_default():
    assert_help_everywhere(cli.build_parser())


def test_restated_defaults_match_the_config_classes():
    from cloud.rpc.handlers import Limits
    from emulator.adapters.lora import LoraSettings
    from emulator.offsite.distill import DistillSettings

    limits = Limits()
    assert cli.LIMITS == {"max_streams_per_client": limits.max_streams_per_client,
                          "max_tensor_mb": limits.max_tensor_bytes / 2**20, "idle_timeout_s": limits.idle_timeout_s}
    assert (cli.LORA_RANK, cli.LORA_ALPHA) == (LoraSettings.rank, LoraSettings.alpha)
    distill = DistillSettings()
    assert cli.DISTILL == {k: getattr(distill, k) for k in cli.DISTILL}
