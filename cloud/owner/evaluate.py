"""``edgetune-cloud evaluate``: the model owner scores a registered adapter on evaluation data it owns.

Recipe: take the adapter out of the registry (decrypted, authenticated) -> load the full model and plug
the adapter in (:func:`emulator.adapters.plugin.plug_in`, a merged copy) -> score the multiple-choice rows
the way the edge does (:mod:`emulator.data.scoring`) -> report. :func:`score_adapter` does the middle two
here, or as a Ray task on the cluster (``--backbone ray``), loading the model where it runs. The base
model can be scored beside it on the same rows (``--baseline``). Nothing here talks to an edge: the data
is the model owner's own.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from cloud.backbone.ray_runner import RaySettings
from cloud.store.registry import AdapterRegistry
from emulator.adapters.plugin import check_fits, plug_in
from emulator.data.datasets import Dataset, load_eval, parse_eval
from emulator.data.scoring import accuracy, predict
from emulator.model.loading import compute_dtype, load_causal_lm, load_tokenizer, resolve_model


class EvaluateError(ValueError):
    """Bad ``evaluate`` settings, or an adapter that does not fit the model; one line, with the fix."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``edgetune-cloud evaluate``; :meth:`problems` lists every mistake at once."""

    model: str
    store: Path
    adapter: str
    data: Path
    owner: str | None = None  # None: the adapter's owner, from the registry
    seq_len: int = 128
    batch: int = 32
    baseline: bool = False
    dtype: str = "float32"
    threads: int = 0
    ray: RaySettings | None = None  # score on a Ray cluster (``evaluate --backbone ray``)

    def problems(self) -> list[str]:
        out = []
        if self.seq_len < 2 or self.batch < 1:
            out.append("--seq-len must be at least 2 and --batch at least 1")
        try:
            compute_dtype(self.dtype)
        except ValueError as err:
            out.append(str(err))
        if not (self.store / "registry.sqlite").is_file():
            out.append(f"--store {self.store}: no adapter registry here (the directory `serve --store` used)")
        return out


@dataclass(frozen=True)
class EvaluateResult:
    adapter_id: str
    owner: str
    rows: int
    truncated: int
    accuracy: float
    base_accuracy: float | None


def evaluate_recipe(cfg: EvaluateConfig) -> EvaluateResult:
    problems = cfg.problems()
    if problems:
        raise EvaluateError("; ".join(problems))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parse_eval(cfg.data)  # bad data fails before the model loads
    model_dir = resolve_model(cfg.model)
    registry = AdapterRegistry(cfg.store)
    try:
        owner = cfg.owner or registry.owner_of(cfg.adapter)
        _, files = registry.get(owner, cfg.adapter)
    finally:
        registry.close()
    tokenizer = load_tokenizer(model_dir)
    data = load_eval(cfg.data, tokenizer, cfg.seq_len)
    args = (str(model_dir), cfg.model, files, data, int(tokenizer.pad_token_id), cfg.batch, cfg.dtype, cfg.baseline,
            cfg.threads, cfg.adapter)
    if cfg.ray is not None:  # the scoring runs on the cluster; the model loads there, not here
        from cloud.backbone.ray_runner import run_task

        accuracy, base_accuracy = run_task(cfg.ray, score_adapter, *args)
    else:
        accuracy, base_accuracy = score_adapter(*args)
    return EvaluateResult(cfg.adapter, owner, len(data.examples), data.truncated, accuracy, base_accuracy)


def score_adapter(model_dir: str, model_name: str, files: dict[str, bytes], data: Dataset, pad: int, batch: int,
                  dtype: str, baseline: bool, threads: int = 0, adapter: str = "") -> tuple[float, float | None]:
    """Accuracy of the base model with the adapter ``files`` plugged in (and of the base alone if
    ``baseline``). Runs here or as a Ray task (``evaluate --backbone ray``): it loads the model itself,
    from ``model_dir`` where that exists on this machine, else from ``model_name`` resolved here.
    """
    if threads:
        torch.set_num_threads(threads)
    path = Path(model_dir) if (Path(model_dir) / "config.json").is_file() else resolve_model(model_name)
    base = load_causal_lm(path).requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():
            (Path(tmp) / name).write_bytes(blob)
        try:
            check_fits(base, Path(tmp))
        except ValueError as err:
            raise EvaluateError(f"adapter {adapter} does not fit --model {model_name}: {err}") from None
        tuned = plug_in(base, Path(tmp))
    compute = compute_dtype(dtype)
    accuracy = accuracy_of(tuned, data, pad, batch, compute, f"adapter {adapter}")
    base_accuracy = accuracy_of(base, data, pad, batch, compute, "base model") if baseline else None
    return accuracy, base_accuracy


@torch.no_grad()
def accuracy_of(model: PreTrainedModel, data: Dataset, pad_id: int, batch: int,
                dtype: torch.dtype = torch.float32, desc: str = "eval") -> float:
    """Accuracy of a full causal LM on multiple-choice rows (right padding; the causal mask keeps pads
    after every scored position out of its attention). The model is converted to ``dtype`` in place."""
    nn.Module.to(model, dtype).eval()
    body, head = model.base_model, model.get_output_embeddings()

    def features(ids: torch.Tensor) -> torch.Tensor:
        return body(input_ids=ids).last_hidden_state  # final norm applied by every supported family

    return accuracy(data.examples, lambda chunk: predict(chunk, features, head, pad_id), batch, desc, leave=True)
