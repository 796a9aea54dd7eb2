"""``edgetune-edge predict --runtime onnx`` and ``eval --runtime onnx``: split inference with the edge on
onnxruntime and the middle on the cloud, over the usual mutual-TLS stream. Imports no torch.

Setup (verify the export, tokenize, open a split session and check the cloud serves the export's base
model), predict batch by batch, write one JSONL row per input in input order, clean up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge.runtime.inputs import Row, load_rows
from edge.runtime.manifest import ExportError, check_base_model, read_manifest
from edge.runtime.onnx_runner import EdgeClock, Middle, OnnxEdge, choose, complete, length_batches
from edge.runtime.remote import ArrayMiddle, open_split_session
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from protocol.fileio import atomic_write


@dataclass
class PredictResult:
    records: list[dict]
    traffic: Traffic
    clock: EdgeClock
    note: str = ""

    @property
    def accuracy(self) -> float | None:
        scored = [r["correct"] for r in self.records if "correct" in r]
        return sum(scored) / len(scored) if scored else None


def predict_rows(edge: OnnxEdge, middle: Middle, rows: list[Row], tokenizer, pad_id: int, eos_id: int | None,
                 batch: int, max_new_tokens: int) -> list[dict]:
    """One record per row, in input order: the chosen label (rows with choices) or the greedy completion."""
    records: dict[int, dict] = {}
    labelled = [r for r in rows if r.choices]
    for chunk in length_batches(labelled, batch):
        for row, (choice, scores) in zip(chunk, choose(edge, middle, chunk, pad_id)):
            record = {"index": row.index, "prediction": choice, "label": row.choices[choice], "scores": scores}
            if row.answer is not None:
                record.update(answer=row.answer, correct=choice == row.answer)
            records[row.index] = record
    for chunk in length_batches([r for r in rows if not r.choices], batch):
        for row, ids in zip(chunk, complete(edge, middle, chunk, pad_id, eos_id, max_new_tokens)):
            records[row.index] = {"index": row.index, "completion": tokenizer.decode(ids, skip_special_tokens=True)}
    return [records[r.index] for r in rows]


def predict(model: Path, cloud: str, identity: Path, data: Path, seq_len: int = 64, batch: int = 32,
            max_new_tokens: int = 16, threads: int = 0, wire_dtype: str = "float32") -> PredictResult:
    """Runs split inference over every row of ``data`` with the export in ``model``."""
    from tokenizers import Tokenizer

    manifest = read_manifest(model)
    tokenizer = Tokenizer.from_file(str(model / manifest["tokenizer"]["file"]))
    rows = load_rows(data, tokenizer, seq_len, max_new_tokens)
    edge = OnnxEdge(model, threads)
    traffic = Traffic()
    base = manifest["base_model"]
    with secure_channel(cloud, identity) as channel:
        info = open_split_session(channel, base["edge_layers"], traffic)
        m = info.model
        check_base_model(manifest, m.model_name, m.model_type, m.num_blocks, m.hidden_size, cloud)
        if m.edge_layers != base["edge_layers"]:
            raise ExportError(f"the cloud at {cloud} opened a session with --edge-layers {m.edge_layers}, the "
                              f"export holds {base['edge_layers']}; export again for this cloud")
        middle = ArrayMiddle(channel, info.session_id, traffic, wire_dtype)
        try:
            records = predict_rows(edge, middle, rows, tokenizer, manifest["tokenizer"]["pad_id"],
                                   manifest["tokenizer"].get("eos_id"), batch, max_new_tokens)
        finally:
            middle.close()
    return PredictResult(records, traffic, edge.clock, scope_note(manifest))


def scope_note(manifest: dict) -> str:
    """One line when the export leaves part of the adapter out (dlora), else empty."""
    dropped = manifest["adapter"].get("dropped_modules") or []
    if not dropped:
        return ""
    return (f"note: this export holds the edge blocks of a dlora adapter; its {len(dropped)} LoRA modules of "
            f"cloud-held blocks are not applied (the cloud's middle is the base model's)")


def write_records(records: list[dict], out: Path) -> None:
    atomic_write(out, "".join(json.dumps(r) + "\n" for r in records).encode())
