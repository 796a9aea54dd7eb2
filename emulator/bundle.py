"""The edge bundle: what an edge needs to run its segments, as plain files.

A bundle directory holds ``config.json``, the tokenizer files, ``split.json`` (the split plan) and
``edge.safetensors`` with every parameter and buffer of the :class:`EdgeModel` (never a middle
block). The cloud writes it (:func:`write_bundle`); the edge rebuilds the segments from it without
ever materialising the full model (:func:`load_edge_model`). The bundle id is a content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from emulator.segments import EdgeModel, SplitPlan, extract_edge, plan_for

WEIGHTS = "edge.safetensors"
PLAN = "split.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "tokenizer.model")


def bundle_files(directory: Path) -> list[Path]:
    """The files of a bundle directory, in a fixed order."""
    return sorted(p for p in directory.iterdir() if p.is_file())


def bundle_id(directory: Path) -> str:
    """Content hash over the names and bytes of every bundle file."""
    digest = hashlib.sha256()
    for path in bundle_files(directory):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def edge_tensors(edge: EdgeModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of the edge segments, by name."""
    tensors = {n: p.detach() for n, p in edge.named_parameters()}
    tensors.update({n: b.detach() for n, b in edge.named_buffers()})
    return tensors


def write_bundle(model: PreTrainedModel, model_dir: Path, plan: SplitPlan, root: Path,
                 model_name: str) -> Path:
    """Writes the bundle of ``plan`` under ``root/<bundle_id>`` (idempotent) and returns its path."""
    dtype = _storage_dtype(model_dir)
    edge = extract_edge(model, plan)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=_mkdir(root)))
    try:
        tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in edge_tensors(edge).items()}
        tensors, aliases = _dedupe(tensors)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / WEIGHTS))
        model.config.to_json_file(str(tmp / "config.json"))
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        plan_json = {"num_blocks": plan.n_blocks, "edge_layers": plan.edge_layers,
                     "model_name": model_name, "dtype": str(dtype).removeprefix("torch."),
                     "aliases": aliases}
        (tmp / PLAN).write_text(json.dumps(plan_json, indent=2))
        target = root / bundle_id(tmp)
        if not target.exists():
            os.replace(tmp, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_plan(directory: Path) -> tuple[SplitPlan, dict]:
    """The split plan and metadata stored in a bundle."""
    meta = json.loads((directory / PLAN).read_text())
    return SplitPlan(meta["num_blocks"], meta["edge_layers"]), meta


def load_edge_model(directory: Path) -> EdgeModel:
    """Rebuilds the edge segments (fp32) from a bundle, building no full model in memory."""
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "sdpa"
    plan, _ = read_plan(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    edge = extract_edge(skeleton, plan_for(config, plan.edge_layers))
    edge = edge.to_empty(device="cpu")
    tensors = load_file(str(directory / WEIGHTS))
    for alias, source in read_plan(directory)[1].get("aliases", {}).items():
        tensors[alias] = tensors[source]
    expected = edge_tensors(edge)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise ValueError(f"{directory / WEIGHTS} does not match the edge segments (missing {missing})")
    with torch.no_grad():
        for name, target in expected.items():
            value = tensors[name]
            target.copy_(value.to(torch.float32) if value.is_floating_point() else value)
    return edge.float().eval()


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stores identical tensors once (e.g. an LM head tied to the embedding); returns the aliases."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_shape: dict[tuple, list[str]] = {}
    for name, tensor in tensors.items():
        twin = next((k for k in by_shape.get((tensor.shape, tensor.dtype), [])
                     if torch.equal(kept[k], tensor)), None)
        if twin is not None:
            aliases[name] = twin
            continue
        kept[name] = tensor
        by_shape.setdefault((tensor.shape, tensor.dtype), []).append(name)
    return kept, aliases


def _storage_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint is stored in: shipping the segments in it loses nothing."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
