import json
import os
import sqlite3
import time

import pytest
import torch
from safetensors.torch import save_file

from cloud.errors import InvalidArgument, NotFound
from cloud.store.registry import ORPHAN_AGE_S, AdapterRegistry
from cloud.store.vault import CorruptArtifactError, Vault
from protocol.fileio import atomic_write
from protocol.types import AdapterMeta


def staged(tmp_path, name="s", keys=("base_model.model.x.lora_A.weight",), peft_type="LORA"):
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    save_file({k: torch.zeros(2, 2) for k in keys}, str(d / "adapter_model.safetensors"))
    return d


def test_owners_only_see_their_own(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    a = reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "a"))
    b = reg.add("bob", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "b"))
    assert [m.adapter_id for m in reg.list("alice")] == [a.adapter_id]
    assert a.owner == "alice" and a.size_bytes > 0 and a.created
    meta, files = reg.get("alice", a.adapter_id)
    assert meta == a
    assert files["adapter_model.safetensors"] == (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(NotFound, match="no adapter .* belongs to identity 'alice'"):
        reg.get("alice", b.adapter_id)
    reg.close()
    again = AdapterRegistry(tmp_path / "store")  # survives a restart
    assert [m.adapter_id for m in again.list("bob")] == [b.adapter_id]


def test_bad_uploads_are_refused(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    with pytest.raises(InvalidArgument, match="only contain LoRA tensors"):
        reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "x", keys=("model.embed.weight",)))
    with pytest.raises(InvalidArgument, match="LORA adapter"):
        reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "y", peft_type="IA3"))
    bad = staged(tmp_path, "z")
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InvalidArgument, match="do not parse"):
        reg.add("alice", AdapterMeta(mode="split", base_model="m"), bad)
    assert reg.list("alice") == []


def test_files_at_rest_are_encrypted_and_authenticated(tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    a = reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "a"))
    b = reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "b"))
    sealed = tmp_path / "store" / "adapters" / a.adapter_id / "adapter_config.json.enc"
    assert b"LORA" not in sealed.read_bytes()  # ciphertext, not the JSON
    assert (tmp_path / "store" / "store.key").stat().st_mode & 0o777 == 0o600
    original = sealed.read_bytes()
    flipped = bytearray(original)
    flipped[20] ^= 1
    sealed.write_bytes(bytes(flipped))
    with pytest.raises(CorruptArtifactError, match="failed authentication"):
        reg.get("alice", a.adapter_id)
    sealed.write_bytes(original[:10])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        reg.get("alice", a.adapter_id)
    other = tmp_path / "store" / "adapters" / b.adapter_id / "adapter_config.json.enc"
    sealed.write_bytes(other.read_bytes())  # a valid file moved under another adapter's name
    with pytest.raises(CorruptArtifactError):
        reg.get("alice", a.adapter_id)
    sealed.write_bytes(original)
    assert reg.get("alice", a.adapter_id)[1]["adapter_config.json"] == b'{"peft_type": "LORA"}'


def test_crash_between_files_and_index_leaves_old_state(tmp_path):
    store = tmp_path / "store"
    reg = AdapterRegistry(store)
    kept = reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "a"))

    reg._db.close()  # the index becomes unwritable: files land, the row never does
    with pytest.raises(sqlite3.ProgrammingError):
        reg.add("alice", AdapterMeta(mode="split", base_model="m"), staged(tmp_path, "b"))
    assert len(list((store / "adapters").iterdir())) == 2  # an orphan directory was left behind
    (orphan,) = [d for d in (store / "adapters").iterdir() if d.name != kept.adapter_id]
    old = time.time() - ORPHAN_AGE_S - 60
    for path in [orphan, *orphan.iterdir()]:
        os.utime(path, (old, old))
    again = AdapterRegistry(store)  # restart: the old orphan is removed, the committed adapter survives
    assert [m.adapter_id for m in again.list("alice")] == [kept.adapter_id]
    assert [d.name for d in (store / "adapters").iterdir()] == [kept.adapter_id]


def test_a_second_coordinator_starting_up_keeps_an_upload_in_progress(tmp_path):
    """Files are written before their row: a directory without a row may be another coordinator's upload."""
    store = tmp_path / "store"
    first = AdapterRegistry(store)
    upload = store / "adapters" / "ad-inflight"  # what first.add has written so far: files, no row yet
    upload.mkdir()
    first.vault.seal(upload / "adapter_config.json.enc", b'{"peft_type": "LORA"}', "ad-inflight/adapter_config.json")
    AdapterRegistry(store)  # a second coordinator on the same store starts now
    assert upload.is_dir() and len(list(upload.iterdir())) == 1


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def boom(src, dst):
        raise OSError("crash before rename")
    monkeypatch.setattr("protocol.fileio.os.replace", boom)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"


def test_key_file_with_loose_permissions_is_refused(tmp_path):
    Vault(tmp_path)
    (tmp_path / "store.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        Vault(tmp_path)
