import json

import pytest
import torch
from safetensors.torch import save_file

from cloud.errors import InvalidArgument, NotFound
from cloud.registry import AdapterRegistry
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
    meta, directory = reg.get("alice", a.adapter_id)
    assert meta == a and (directory / "adapter_model.safetensors").is_file()
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
