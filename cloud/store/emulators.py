"""The cloud's emulator store: build an Offsite-Tuning emulator once, keyed by model and settings.

``store/emulators/<key>/`` holds ``emulator.safetensors`` (fp32 tensors of the kept, possibly
distilled blocks) and ``emulator.json`` (settings, kept blocks, distillation losses). The key hashes
the model's weights and every setting, so a changed model or setting builds a new emulator and an
unchanged one is reused. An interrupted distillation resumes from ``store/emulators/<key>.partial``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.model.arch import hidden_size
from emulator.model.segments import BlockStack, SplitModel, plan_for, split_causal_lm
from emulator.offsite.compress import layer_drop, prune_magnitude, quantize_weights
from emulator.offsite.corpus import BUILTIN_SOURCES, held_out_split, load_texts, token_chunks
from emulator.offsite.distill import DistillSettings, distill, evaluate_kd
from emulator.offsite.select import (
    SELECTIONS,
    bridged_emulator,
    cka_matrix,
    contiguous_clusters,
    drop_one_importance,
    representatives,
    selection_chunks,
    shared_emulator,
    top_positions,
)
from emulator.offsite.stack import emulator_modules, unique_parameters
from protocol.fileio import publish_directory

WEIGHTS, META = "emulator.safetensors", "emulator.json"
HELD_OUT_CHUNKS = 32  # distillation loss is reported on this many held-out chunks
SELECT_CHUNKS = 8  # corpus chunks that measure block importance / similarity (8 x 64 tokens)


@dataclass(frozen=True)
class EmulatorSpec:
    """How to build one emulator. ``distill=None``: no distillation.

    ``selection`` picks the kept blocks (see :mod:`emulator.offsite.select`): ``uniform`` spacing,
    ``importance`` (drop-one LM loss on ``distill_data``) or ``crash`` (one block per cluster of similar
    blocks, repeated to the middle's depth). ``bridge_rank > 0`` puts a trained low-rank bridge in place of
    each run of dropped blocks (uniform or importance; it needs distillation to be trained).
    """

    edge_layers: int
    emulator_layers: int
    sparsity: float = 0.0
    bits: int = 0  # 0: no quantization
    distill: DistillSettings | None = None
    distill_data: str = "speeches"
    selection: str = "uniform"
    bridge_rank: int = 0

    @property
    def uses_corpus(self) -> bool:
        return self.distill is not None or self.selection != "uniform"

    def problems(self) -> list[str]:
        out = [] if self.distill is None else self.distill.problems()
        if self.selection not in SELECTIONS:
            out.append(f"--selection {self.selection}: choose one of {', '.join(SELECTIONS)}")
        if self.bridge_rank < 0:
            out.append(f"--bridge-rank {self.bridge_rank}: must be 0 (no bridges) or more")
        if self.bridge_rank and self.selection == "crash":
            out.append("--bridge-rank: CRaSh repeats kept blocks instead of bridging; use 0 with --selection crash")
        if self.bridge_rank and self.distill is None:
            out.append("--bridge-rank: bridges are trained by distillation; also give --distill-steps")
        if not 0.0 <= self.sparsity < 1.0:
            out.append(f"--sparsity {self.sparsity}: must be in [0, 1)")
        if self.bits and not 2 <= self.bits <= 8:
            out.append(f"--bits {self.bits}: choose 2..8, or 0 for no quantization")
        if self.uses_corpus and self.distill_data not in BUILTIN_SOURCES and not Path(
                self.distill_data).is_file():
            out.append(f"--distill-data {self.distill_data}: no such file (or use {', '.join(BUILTIN_SOURCES)})")
        return out


@dataclass(frozen=True)
class StoredEmulator:
    key: str
    directory: Path
    meta: dict

    @property
    def blocks(self) -> list[int]:
        return list(self.meta["blocks"])

    @property
    def distilled(self) -> bool:
        return bool(self.meta.get("distilled"))

    def load(self, model: PreTrainedModel) -> BlockStack:
        """The emulator as modules (structure copied from ``model``'s blocks, weights from the store)."""
        stack = emulator_modules(model, self.meta)
        stack.load_state_dict(load_file(str(self.directory / WEIGHTS)))
        return stack.float().eval().requires_grad_(False)

    def public_meta(self) -> dict:
        """What the edge may learn about its emulator (goes into the bundle's ``split.json``)."""
        keys = ("key", "distilled", "sparsity", "bits", "kd_before", "kd_after", "selection", "order", "bridge_rank",
                "unique_share")
        return {k: self.meta[k] for k in keys if k in self.meta}


_FINGERPRINTS: dict[Path, str] = {}


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of a model directory's config and weights (cached per process)."""
    model_dir = model_dir.resolve()
    if model_dir not in _FINGERPRINTS:
        digest = hashlib.sha256()
        for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        _FINGERPRINTS[model_dir] = digest.hexdigest()[:32]
    return _FINGERPRINTS[model_dir]


def emulator_key(fingerprint: str, spec: EmulatorSpec) -> str:
    """The cache key of an emulator: model content + every setting (+ the distillation file's content)."""
    settings = asdict(spec)
    if spec.uses_corpus and spec.distill_data not in BUILTIN_SOURCES:
        settings["distill_data"] = hashlib.sha256(Path(spec.distill_data).read_bytes()).hexdigest()
    if not spec.uses_corpus:
        settings.pop("distill_data")
    blob = json.dumps({"model": fingerprint, **settings}, sort_keys=True)
    return "em-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


def measurement_key(fingerprint: str, spec: EmulatorSpec) -> str:
    """What selection measurements depend on: the model, K and the corpus (not E, bridges or distillation)."""
    seq_len = spec.distill.seq_len if spec.distill is not None else DistillSettings.seq_len
    seed = spec.distill.seed if spec.distill is not None else 0
    corpus = spec.distill_data
    if corpus not in BUILTIN_SOURCES:
        corpus = hashlib.sha256(Path(corpus).read_bytes()).hexdigest()
    blob = json.dumps([fingerprint, spec.edge_layers, corpus, seq_len, seed, SELECT_CHUNKS])
    return "measured-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


class EmulatorStore:
    """Emulators under ``store/emulators``."""

    def __init__(self, store: Path) -> None:
        self.root = store / "emulators"

    def get(self, key: str) -> StoredEmulator | None:
        directory = self.root / key
        if not (directory / META).is_file():
            return None
        return StoredEmulator(key, directory, json.loads((directory / META).read_text()))

    def list(self) -> list[StoredEmulator]:
        if not self.root.is_dir():
            return []
        found = (self.get(p.name) for p in sorted(self.root.iterdir()) if p.is_dir())
        return [e for e in found if e is not None]

    def find(self, fingerprint: str, edge_layers: int, emulator_layers: int) -> StoredEmulator | None:
        """The best stored emulator for a model and shape: distilled before layer-drop-only, then newest."""
        matches = [e for e in self.list() if e.meta["model_fingerprint"] == fingerprint
                   and e.meta["edge_layers"] == edge_layers and e.meta["emulator_layers"] == emulator_layers]
        matches.sort(key=lambda e: (e.distilled, e.meta.get("built", "")), reverse=True)
        return matches[0] if matches else None

    def serving(self, model: PreTrainedModel, model_name: str, fingerprint: str, spec: EmulatorSpec,
                tokenizer: PreTrainedTokenizerBase | None) -> StoredEmulator:
        """The emulator ``serve`` hands out for ``spec``'s (K, E): ``spec`` itself if stored, else the best
        stored one of that shape (see :meth:`find`), else ``spec`` built now."""
        stored = self.get(emulator_key(fingerprint, spec)) or self.find(fingerprint, spec.edge_layers,
                                                                         spec.emulator_layers)
        return stored or self.build(model, model_name, fingerprint, spec, tokenizer, progress=False)

    def build(self, model: PreTrainedModel, model_name: str, fingerprint: str, spec: EmulatorSpec,
              tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True) -> StoredEmulator:
        """Builds (or returns the cached) emulator of ``spec`` for ``model``."""
        key = emulator_key(fingerprint, spec)
        cached = self.get(key)
        if cached is not None:
            return cached
        start = time.perf_counter()
        student, meta = build_emulator(model, spec, tokenizer, self.root / f"{key}.partial", progress,
                                       self.root / f"{measurement_key(fingerprint, spec)}.json")
        meta.update(key=key, model_name=model_name, model_fingerprint=fingerprint,
                    build_s=time.perf_counter() - start,  # of this (possibly resumed) run
                    built=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self._write(key, student, meta)
        shutil.rmtree(self.root / f"{key}.partial", ignore_errors=True)
        return self.get(key)  # type: ignore[return-value]

    def _write(self, key: str, student: BlockStack, meta: dict) -> None:
        def fill(tmp: Path) -> Path:
            save_file({k: v.detach().float().contiguous() for k, v in student.state_dict().items()},
                      str(tmp / WEIGHTS))
            (tmp / META).write_text(json.dumps(meta, indent=2))
            return self.root / key

        publish_directory(self.root, fill)


def build_emulator(model: PreTrainedModel, spec: EmulatorSpec, tokenizer: PreTrainedTokenizerBase | None,
                   checkpoint: Path, progress: bool = True, measurements: Path | None = None
                   ) -> tuple[BlockStack, dict]:
    """Block selection, optional distillation, then optional pruning and quantization.

    ``checkpoint`` is the distillation's resume directory; the selection's measurements (block
    importance, block similarity) are kept in ``measurements`` (default ``<checkpoint>.select.json``), so
    a resumed build, or another build on the same model, depth K and corpus, does not measure again.

    Returns:
        The emulator and its metadata (kept blocks, run order, settings, unique-parameter share,
        held-out KD losses before/after).
    """
    plan = plan_for(model.config, spec.edge_layers)  # raises SplitError for a bad K
    split = split_causal_lm(model, spec.edge_layers)
    train = held = None
    if spec.uses_corpus:
        if tokenizer is None:
            raise ValueError("block selection and distillation need the model's tokenizer")
        seq_len = spec.distill.seq_len if spec.distill is not None else DistillSettings.seq_len
        seed = spec.distill.seed if spec.distill is not None else 0
        texts = load_texts(spec.distill_data, model, tokenizer, seed=seed)
        train, held = held_out_split(token_chunks(texts, tokenizer, seq_len))
        held = held[:HELD_OUT_CHUNKS]
    cache = measurements or checkpoint.with_name(checkpoint.name + ".select.json")
    student, meta = _select(split, spec, train, cache, hidden_size(model.config))
    meta.update({"edge_layers": spec.edge_layers, "emulator_layers": spec.emulator_layers, "blocks": student.indices,
                 "middle_blocks": plan.middle, "sparsity": spec.sparsity, "bits": spec.bits,
                 "selection": spec.selection, "bridge_rank": spec.bridge_rank,
                 "order": list(getattr(student, "order", [])) or None,
                 "unique_share": unique_parameters(student) / unique_parameters(split.middle),
                 "distilled": spec.distill is not None,
                 "distill": asdict(spec.distill) if spec.distill else None,
                 "distill_data": spec.distill_data if spec.uses_corpus else None})
    if spec.distill is not None:
        assert train is not None and held is not None
        weight = spec.distill.hidden_weight
        meta["kd_before"] = asdict(evaluate_kd(split.edge, split.middle, student, held, weight))
        result = distill(split.edge, split.middle, student, train, spec.distill, checkpoint, progress=progress)
        student = result.student
        meta["kd_after"] = asdict(evaluate_kd(split.edge, split.middle, student, held, weight))
        meta.update(train_chunks=len(train), held_out_chunks=len(held), resumed_from=result.start_step,
                    history=result.history[:: max(1, len(result.history) // 50)])
    if spec.sparsity:
        student = prune_magnitude(student, spec.sparsity)
    if spec.bits:
        student = quantize_weights(student, spec.bits)
    return student, meta


def _select(split: SplitModel, spec: EmulatorSpec, train: torch.Tensor | None, cache: Path,
            hidden: int) -> tuple[BlockStack, dict]:
    """The undistilled emulator of ``spec.selection`` and what was measured to choose it (cached in ``cache``)."""
    if spec.selection == "uniform":
        student = layer_drop(split.middle, spec.emulator_layers)  # raises EmulatorError for a bad E
        if spec.bridge_rank:
            positions = [split.middle.indices.index(i) for i in student.indices]
            student = bridged_emulator(split.middle, positions, hidden, spec.bridge_rank)
        return student, {}
    measured = json.loads(cache.read_text()) if cache.is_file() else {}
    if spec.selection not in measured:
        assert train is not None, "selection needs the corpus"
        chunks = selection_chunks(train, SELECT_CHUNKS)
        measure = drop_one_importance if spec.selection == "importance" else cka_matrix
        measured[spec.selection] = measure(split.edge, split.middle, chunks)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured))
    if spec.selection == "importance":
        importance = measured["importance"]
        positions = top_positions(importance, spec.emulator_layers)
        return bridged_emulator(split.middle, positions, hidden, spec.bridge_rank), {"importance": importance}
    sim = measured["crash"]
    clusters = contiguous_clusters(sim, spec.emulator_layers)
    reps = representatives(sim, clusters)
    return shared_emulator(split.middle, clusters, reps), {"clusters": clusters, "cka": sim}


def default_emulator_layers(n_middle: int) -> int:
    """A third of the middle (2-8-2 for a 30-block model with K=2), at least 1."""
    return max(1, min(n_middle - 1, n_middle // 3))


# The default construction (docs/offsite_benchmark.md): the kept blocks are the most important ones by
# drop-one LM loss on the cloud's own text; training-free, so it is built in a minute, on demand.
DEFAULT_SELECTION = "importance"


def default_spec(edge_layers: int, n_middle: int, emulator_layers: int = 0) -> EmulatorSpec:
    """The emulator ``serve`` and the demo use: :data:`DEFAULT_SELECTION` at depth ``emulator_layers``
    (0: a third of the middle), measured on the built-in ``speeches`` text."""
    return EmulatorSpec(edge_layers, emulator_layers or default_emulator_layers(n_middle),
                        selection=DEFAULT_SELECTION)


class BuildConfigError(ValueError):
    """Invalid ``emulator build`` settings; lists every problem at once."""


@dataclass(frozen=True)
class BuildConfig:
    """Settings of ``edgetune-cloud emulator build``, validated at construction."""

    model: str
    store: Path
    spec: EmulatorSpec
    threads: int = 0

    def __post_init__(self) -> None:
        problems = self.spec.problems()
        if self.spec.edge_layers < 1:
            problems.append(f"--edge-layers {self.spec.edge_layers}: must be at least 1")
        if self.spec.emulator_layers < 1:
            problems.append(f"--emulator-layers {self.spec.emulator_layers}: must be at least 1")
        if problems:
            raise BuildConfigError("; ".join(problems))


def build_recipe(cfg: BuildConfig) -> StoredEmulator:
    """Resolves and loads the model, then builds (or finds cached) the emulator in the store."""
    from emulator.model.loading import load_causal_lm, load_tokenizer, resolve_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model(cfg.model)
    model = load_causal_lm(model_dir).requires_grad_(False)
    tokenizer = load_tokenizer(model_dir) if cfg.spec.uses_corpus else None
    store = EmulatorStore(cfg.store)
    stored = store.build(model, cfg.model, model_fingerprint(model_dir), cfg.spec, tokenizer)
    return stored
