"""``edgetune-edge export``: the edge segments with a trained adapter merged, as ONNX for onnxruntime.

The export directory holds ``bottom.onnx`` (token ids ``(batch, seq)`` to the hidden state at the
lower cut ``(batch, seq, hidden)``), ``top.onnx`` (the hidden state at the upper cut and ``(n, 2)``
``(row, position)`` pairs to ``(n, vocab)`` logits at just those positions, so a scorer never pays
for a full-vocabulary projection it does not read), ``tokenizer.json`` and ``manifest.json``. Batch,
sequence and position counts are dynamic.

The base weights come from an edge bundle (the one ``train``/``eval`` downloaded into the cache, or
``--bundle DIR``); no full model is ever built. A LoRA adapter is merged into the weights (``W + s·BA``),
a delta adapter (``--tune full``) added to them.

dlora adapters also hold LoRA for cloud-held blocks. Those cannot run on the edge's segments and the
cloud's middle serves the base blocks, so the export merges the edge-block LoRA only, records the
modules it left out under ``adapter.dropped_modules`` in the manifest, and says so in one printed
line: predictions then use the base middle, which is not the model dlora trained.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from edge.runtime.manifest import BOTTOM, FORMAT, TOKENIZER, TOP, VERSION, ExportError, write_manifest
from emulator.adapters.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterMismatchError,
    add_lora,
    load_adapter_state,
    load_into_segments,
)
from emulator.adapters.plugin import DELTA_CONFIG, DELTA_WEIGHTS, adapter_format, apply_to_edge, lora_settings_of
from emulator.model.arch import hidden_size
from emulator.model.bundle import PLAN, bundle_id, load_edge_model, read_plan
from emulator.model.loading import cache_root, load_tokenizer
from emulator.model.segments import EdgeModel, EdgeTop, SplitPlan

M = TypeVar("M", bound=nn.Module)
OPSET = 18
QUANTIZE = ("int8",)
TOKENIZER_PROBES = ("Review: a gripping, funny film.\nSentiment:", " positive", " negative", "Hello world")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: dict
    note: str  # one line for the user (e.g. what a dlora export leaves out)


class TopAt(nn.Module):
    """The top segment projecting only the requested positions: ``(batch, seq, hidden)`` states and
    ``(n, 2)`` ``(row, position)`` pairs to ``(n, vocab)`` logits."""

    def __init__(self, top: EdgeTop):
        super().__init__()
        self.top = top

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        features = self.top.features(hidden)
        return self.top.lm_head(features[positions[:, 0], positions[:, 1]])


def merge_lora(model: M) -> M:
    """Merges every injected LoRA layer into its base weight and puts the plain layer back (in place)."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module.base_layer)
    return model


def _block_index(key: str) -> int:
    """The decoder-block index in a full-model tensor name (the first numeric component, in every family)."""
    m = re.search(r"\.(\d+)\.", key)
    if m is None:
        raise ExportError(f"adapter tensor {key!r} is not inside a decoder block; is this an edgetune adapter?")
    return int(m.group(1))


def adapter_blocks(adapter: Path) -> set[int]:
    """Indices of the decoder blocks an adapter changes."""
    if adapter_format(adapter) == "lora":
        keys = load_adapter_state(adapter)[0].keys()
    else:
        keys = json.loads((adapter / DELTA_CONFIG).read_text())["parameters"]
    return {_block_index(k) for k in keys}


def merged_edge(edge: EdgeModel, adapter: Path, plan: SplitPlan) -> tuple[EdgeModel, list[str]]:
    """The edge segments with the adapter merged, and the adapter modules left out (cloud-held blocks)."""
    spec = edge.bottom.spec
    if adapter_format(adapter) == "delta":
        return apply_to_edge(edge, adapter, spec).eval(), []
    state, _ = load_adapter_state(adapter)
    kept = {k: v for k, v in state.items() if _block_index(k) in plan.edge}
    dropped = sorted({k.rpartition(".lora_")[0].removeprefix("base_model.model.") for k in state if k not in kept})
    if not kept:
        raise ExportError(f"{adapter}: no LoRA weights for the edge blocks {plan.edge}; was it trained with "
                          f"another --edge-layers?")
    settings = lora_settings_of(adapter)
    model = add_lora(edge, settings, spec)
    load_into_segments(model, kept, spec)
    return merge_lora(model).eval(), dropped


def find_bundle(base_model: str, blocks: set[int], edge_layers: int = 0) -> Path:
    """The cached bundle of ``base_model`` whose edge holds the adapter's blocks (see the module docstring)."""
    root = cache_root() / "bundles"
    found: list[tuple[Path, SplitPlan]] = []
    for plan_file in sorted(root.glob(f"*/{PLAN}")):
        plan, meta = read_plan(plan_file.parent)
        if meta.get("model_name") == base_model and (not edge_layers or plan.edge_layers == edge_layers):
            found.append((plan_file.parent, plan))
    exact = {p.edge_layers: d for d, p in found if blocks == set(p.edge)}
    inside = {p.edge_layers: d for d, p in found if blocks <= set(p.edge)}
    every = {p.edge_layers: d for d, p in found if blocks == set(range(p.n_blocks))}  # dlora: all blocks
    for candidates in (exact, inside, every):
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        if len(candidates) > 1:
            raise ExportError(f"bundles for {base_model!r} with --edge-layers {sorted(candidates)} all fit the "
                              f"adapter; pass --edge-layers K (the value used in training)")
    raise ExportError(f"no cached edge bundle of {base_model!r} fits the adapter (under {root}); run "
                      f"`edgetune-edge eval` against the cloud once, or pass --bundle DIR")


def _adapter_meta(adapter: Path, mode: str, dropped: list[str]) -> dict:
    fmt = adapter_format(adapter)
    config, weights = (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if fmt == "lora" else (DELTA_CONFIG, DELTA_WEIGHTS)
    metrics = adapter.parent / "metrics.json"
    adapter_id = json.loads(metrics.read_text()).get("adapter_id") if metrics.is_file() else None
    return {"path": str(adapter.resolve()), "id": adapter_id, "format": fmt, "mode": mode,
            "config_sha256": hashlib.sha256((adapter / config).read_bytes()).hexdigest(),
            "weights_sha256": hashlib.sha256((adapter / weights).read_bytes()).hexdigest(),
            "scope": "edge-blocks-only" if dropped else "complete", "dropped_modules": dropped}


def _export_graphs(edge: EdgeModel, out: Path) -> None:
    ids = torch.randint(1, 2, (2, 7))
    hidden = edge.bottom(ids).detach()
    positions = torch.tensor([[0, 6], [1, 3], [1, 5]])
    seq = {0: "batch", 1: "seq"}
    torch.onnx.export(edge.bottom, (ids,), out / BOTTOM, dynamo=True, external_data=False, opset_version=OPSET,
                      input_names=["input_ids"], output_names=["hidden"], dynamic_shapes={"input_ids": seq})
    torch.onnx.export(TopAt(edge.top).eval(), (hidden, positions), out / TOP, dynamo=True, external_data=False,
                      opset_version=OPSET, input_names=["hidden", "positions"], output_names=["logits"],
                      dynamic_shapes={"hidden": seq, "positions": {0: "n"}})


def _quantize(out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (BOTTOM, TOP):
        fp32 = out / f"{name}.fp32"
        (out / name).rename(fp32)
        # per-channel scales: on SmolLM2 they agreed with fp32 on 0.90 of 40 rows where one scale per
        # tensor agreed on 0.80 (the embedding and the tied LM head span very different row norms)
        quantize_dynamic(fp32, out / name, weight_type=QuantType.QInt8, per_channel=True)
        fp32.unlink()


def _write_tokenizer(bundle: Path, out: Path) -> dict:
    """Writes the tokenizer as ``tokenizers`` runs it and checks it encodes like the training tokenizer."""
    from tokenizers import Tokenizer

    tok = load_tokenizer(bundle)
    (out / TOKENIZER).write_text(tok.backend_tokenizer.to_str())
    plain = Tokenizer.from_file(str(out / TOKENIZER))
    for text in TOKENIZER_PROBES:
        for special in (True, False):
            if plain.encode(text, add_special_tokens=special).ids != tok(text, add_special_tokens=special).input_ids:
                raise RuntimeError(f"tokenizer.json encodes {text!r} differently from the training tokenizer")
    return {"file": TOKENIZER, "pad_id": int(tok.pad_token_id), "eos_id": tok.eos_token_id}


def export(adapter: Path, out: Path, quantize: str | None = None, bundle: Path | None = None,
           edge_layers: int = 0) -> ExportResult:
    """Writes the export directory ``out`` (must not exist or be empty) and returns its manifest."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize {quantize!r}: choose from {', '.join(QUANTIZE)}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out}: exists and is not empty; choose a new directory")
    try:
        fmt = adapter_format(adapter)
    except FileNotFoundError as err:
        raise ExportError(f"--adapter {err}") from None
    config = json.loads((adapter / (ADAPTER_CONFIG if fmt == "lora" else DELTA_CONFIG)).read_text())
    base_model = config.get("base_model_name_or_path", "")
    if bundle is None:
        bundle = find_bundle(base_model, adapter_blocks(adapter), edge_layers)
    elif not (bundle / PLAN).is_file():
        raise ExportError(f"--bundle {bundle}: no {PLAN}; give a bundle directory from the cache")
    plan, meta = read_plan(bundle)
    if meta.get("model_name") != base_model:
        raise ExportError(f"--adapter {adapter} was trained on {base_model!r}, the bundle {bundle} holds "
                          f"{meta.get('model_name')!r}; give the bundle of the adapter's base model")
    edge = load_edge_model(bundle)
    try:
        merged, dropped = merged_edge(edge, adapter, plan)
    except (AdapterMismatchError, ValueError) as err:
        raise ExportError(f"--adapter {adapter}: {err}") from None
    mode = "dlora" if dropped else _run_mode(adapter)
    return _write(merged, bundle, plan, meta, adapter, out, quantize, mode, dropped)


def _run_mode(adapter: Path) -> str:
    metrics = adapter.parent / "metrics.json"
    return str(json.loads(metrics.read_text()).get("mode", "split")) if metrics.is_file() else "split"


def _write(merged: EdgeModel, bundle: Path, plan: SplitPlan, meta: dict, adapter: Path, out: Path,
           quantize: str | None, mode: str, dropped: list[str]) -> ExportResult:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(bundle)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=_mkdir(out.parent)))
    try:
        with torch.no_grad():
            _export_graphs(merged, tmp)
        if quantize:
            _quantize(tmp)
        manifest = {
            "format": FORMAT, "version": VERSION, "opset": OPSET, "precision": quantize or "float32",
            "base_model": {"name": meta["model_name"], "model_type": config.model_type, "num_blocks": plan.n_blocks,
                           "hidden_size": hidden_size(config), "edge_layers": plan.edge_layers,
                           "bundle_id": bundle_id(bundle)},
            "adapter": _adapter_meta(adapter, mode, dropped),
            "tokenizer": _write_tokenizer(bundle, tmp),
            "graphs": {
                "bottom": {"file": BOTTOM, "inputs": {"input_ids": ["int64", "batch", "seq"]},
                           "outputs": {"hidden": ["float32", "batch", "seq", hidden_size(config)]}},
                "top": {"file": TOP, "inputs": {"hidden": ["float32", "batch", "seq", hidden_size(config)],
                                                "positions": ["int64", "n", 2]},
                        "outputs": {"logits": ["float32", "n", config.vocab_size]}},
            },
        }
        manifest_path = write_manifest(tmp, manifest)
        manifest = json.loads(manifest_path.read_text())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note = (f"note: {len(dropped)} dlora LoRA modules of cloud-held blocks are not part of this export; "
            f"predictions over the wire use the cloud's base middle" if dropped else "")
    return ExportResult(out, manifest, note)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
