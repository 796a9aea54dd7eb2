"""The edge bundle: what an edge needs to run its segments, as plain files.

A bundle directory holds ``config.json``, the tokenizer files, ``split.json`` (the split plan) and
``edge.safetensors`` with every parameter and buffer of the :class:`EdgeModel` (never a middle
block). The cloud writes it (:func:`write_bundle`); the edge rebuilds the segments from it without
ever materialising the full model (:func:`load_edge_model`). The bundle id is a content hash.

An offsite bundle adds ``emulator.safetensors``: the lossy emulator of the middle (a few kept and
possibly distilled blocks, see :mod:`emulator.offsite.compress`), described under ``"emulator"`` in
``split.json`` and rebuilt by :func:`load_emulator`. It never holds the middle itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from emulator.model.segments import BlockStack, EdgeModel, SplitPlan, extract_edge, plan_for
from emulator.offsite.stack import emulator_modules
from protocol.fileio import publish_directory

WEIGHTS = "edge.safetensors"
EMULATOR_WEIGHTS = "emulator.safetensors"
PLAN = "split.json"
M = TypeVar("M", bound=nn.Module)
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


def edge_tensors(edge: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) of the edge segments (or an emulator), by name."""
    tensors = {n: p.detach() for n, p in edge.named_parameters()}
    tensors.update({n: b.detach() for n, b in edge.named_buffers()})
    return tensors


def _save_tensors(module: nn.Module, dtype: torch.dtype, path: Path) -> None:
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in edge_tensors(module).items()}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))


def write_bundle(model: PreTrainedModel, model_dir: Path, plan: SplitPlan, root: Path,
                 model_name: str, emulator: BlockStack | None = None, emulator_meta: dict | None = None) -> Path:
    """Writes the bundle of ``plan`` under ``root/<bundle_id>`` (idempotent) and returns its path.

    With ``emulator`` (offsite mode) the bundle also holds the emulator's tensors and ``emulator_meta``
    (its kept block indices are always recorded).
    """
    dtype = _storage_dtype(model_dir)
    edge = extract_edge(model, plan)
    def fill(tmp: Path) -> Path:
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
        if emulator is not None:
            _save_tensors(emulator, dtype, tmp / EMULATOR_WEIGHTS)
            plan_json["emulator"] = {**(emulator_meta or {}), "blocks": emulator.indices}
        (tmp / PLAN).write_text(json.dumps(plan_json, indent=2))
        return root / bundle_id(tmp)

    return publish_directory(root, fill)


def read_plan(directory: Path) -> tuple[SplitPlan, dict]:
    """The split plan and metadata stored in a bundle."""
    meta = json.loads((directory / PLAN).read_text())
    return SplitPlan(meta["num_blocks"], meta["edge_layers"]), meta


def _skeleton(directory: Path) -> PreTrainedModel:
    """The full model's structure on the meta device: shapes only, no memory, no weights."""
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _fill(module: M, path: Path, aliases: dict[str, str] | None = None) -> M:
    """Materialises a meta-device module on the CPU with the tensors stored in ``path`` (fp32)."""
    module = module.to_empty(device="cpu")
    tensors = load_file(str(path))
    for alias, source in (aliases or {}).items():
        tensors[alias] = tensors[source]
    expected = edge_tensors(module)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise ValueError(f"{path} does not match the segments it should fill (missing {missing})")
    with torch.no_grad():
        for name, target in expected.items():
            value = tensors[name]
            target.copy_(value.to(torch.float32) if value.is_floating_point() else value)
    return module.float().eval()


def load_edge_model(directory: Path) -> EdgeModel:
    """Rebuilds the edge segments (fp32) from a bundle, building no full model in memory."""
    skeleton = _skeleton(directory)
    plan, meta = read_plan(directory)
    return _fill(extract_edge(skeleton, plan_for(skeleton.config, plan.edge_layers)), directory / WEIGHTS,
                 meta.get("aliases", {}))


def load_emulator(directory: Path) -> BlockStack:
    """Rebuilds the emulator (fp32) of an offsite bundle.

    Raises:
        ValueError: the bundle is a split bundle without an emulator.
    """
    _, meta = read_plan(directory)
    if "emulator" not in meta or not (directory / EMULATOR_WEIGHTS).is_file():
        raise ValueError(f"{directory}: not an offsite bundle (no {EMULATOR_WEIGHTS})")
    return _fill(emulator_modules(_skeleton(directory), meta["emulator"]), directory / EMULATOR_WEIGHTS)


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

