"""The edge recipes: ``train`` (split mode) and ``evaluate``, each setup -> work -> cleanup.

Offsite mode has its own recipe in :mod:`edge.offsite`; it shares :class:`TrainConfig`,
:func:`evaluate` and :func:`train_loop` with this one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from edge.client import CloudClient
from edge.data import Dataset, load_eval, load_train, parse_eval, parse_train, train_batches
from edge.metrics import FlopMeter, RunMetrics, StepRecord
from edge.split import MiddleLink, RemoteMiddle, score_examples, split_step
from emulator.bundle import load_edge_model
from emulator.lora import LoraSettings, adapter_state_dict, add_lora, lora_parameters, peft_config, save_adapter
from emulator.models import load_tokenizer
from emulator.segments import EdgeModel
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from protocol.tensors import WIRE_DTYPES
from protocol.types import AdapterMeta


class ConfigError(ValueError):
    """Invalid training settings; lists every problem at once."""


MODES = ("split", "offsite")
TUNES = ("lora", "full")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``edgetune-edge train``, validated at construction."""

    cloud: str
    identity: Path
    data: Path
    out: Path
    eval: Path | None = None
    mode: str = "split"
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 64
    # Defaults from docs/calibration.md: the split placement only gains with LoRA on every
    # projection of the edge blocks, a small learning rate, warmup and clipping.
    lr: float = 2e-4
    warmup_steps: int = 20
    schedule: str = "constant_with_warmup"
    clip: float = 1.0
    edge_layers: int = 0  # 0: the cloud's default
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(targets=("all",)))
    wire_dtype: str = "float32"
    eval_batch: int = 32
    seed: int = 0
    threads: int = 0
    tune: str = "lora"  # offsite: "lora" (LoRA on the adapter blocks) or "full" (the adapter blocks' weights)
    emulator_layers: int = 0  # offsite: emulator depth E (0: the cloud's default)
    federated: bool = False  # offsite: join the cloud's FedAvg job instead of a single run

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.tune not in TUNES:
            problems.append(f"--tune {self.tune!r}: choose one of {', '.join(TUNES)}")
        if self.mode != "offsite" and (self.tune != "lora" or self.federated or self.emulator_layers):
            problems.append("--tune full, --federated and --emulator-layers need --mode offsite")
        if self.federated and self.tune != "lora":
            problems.append("--federated rounds average LoRA adapters; drop --tune full")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--lora-rank", self.lora.rank), ("--eval-batch", self.eval_batch)):
            if value < 1:
                problems.append(f"{name} {value}: must be at least 1")
        if self.seq_len < 2:
            problems.append(f"--seq-len {self.seq_len}: must be at least 2")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: must be positive")
        if self.wire_dtype not in WIRE_DTYPES:
            problems.append(f"--wire-dtype {self.wire_dtype!r}: choose one of {', '.join(WIRE_DTYPES)}")
        if not self.data.is_file():
            problems.append(f"--data {self.data}: file not found")
        if self.eval is not None and not self.eval.is_file():
            problems.append(f"--eval {self.eval}: file not found")
        if not self.identity.is_dir():
            problems.append(f"--identity {self.identity}: not a directory (expected DIR/clients/NAME)")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class EdgeSession:
    """An opened session with its segments ready: the shared set-up of train and evaluate."""

    client: CloudClient
    model: EdgeModel
    link: RemoteMiddle
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    pad_id: int


def open_edge_session(client: CloudClient, edge_layers: int, wire_dtype: str) -> EdgeSession:
    info = client.open_session("split", edge_layers)
    bundle = client.bundle(info)
    tokenizer = load_tokenizer(bundle)
    model = load_edge_model(bundle)
    link = RemoteMiddle(client.train_stream(info), wire_dtype)
    return EdgeSession(client, model, link, tokenizer, info.model.model_name, tokenizer.pad_token_id)


def evaluate(model: EdgeModel, link: MiddleLink, data: Dataset, pad_id: int, batch: int,
             traffic: Traffic, desc: str = "eval") -> float:
    """Accuracy of ``model`` on a multiple-choice dataset by split inference."""
    model.eval()
    correct = 0
    # Batching rows of similar length wastes little compute on padding; accuracy is order-free.
    examples = sorted(data.examples, key=lambda ex: max(len(s) for s in ex.sequences))
    with tqdm(total=len(examples), desc=desc, unit="row", leave=False) as bar:
        for i in range(0, len(examples), batch):
            chunk = examples[i:i + batch]
            predictions = score_examples(model, link, chunk, pad_id, traffic)
            correct += sum(p == ex.answer for p, ex in zip(predictions, chunk))
            bar.update(len(chunk))
    return correct / len(examples)


def train(cfg: TrainConfig) -> RunMetrics:
    """Runs ``edgetune-edge train``: returns the metrics it also writes to ``RUN/metrics.json``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parse_train(cfg.data)  # fail on bad data before touching the network
    if cfg.eval is not None:
        parse_eval(cfg.eval)
    start = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    metrics = RunMetrics(mode=cfg.mode, settings=settings)
    with secure_channel(cfg.cloud, cfg.identity) as channel:
        client = CloudClient(channel, metrics.setup)
        es = open_edge_session(client, cfg.edge_layers, cfg.wire_dtype)
        spec = es.model.bottom.spec
        train_data = load_train(cfg.data, es.tokenizer, cfg.seq_len)
        eval_data = load_eval(cfg.eval, es.tokenizer, cfg.seq_len) if cfg.eval else None
        metrics.train_rows, metrics.truncated_rows = len(train_data.examples), train_data.truncated
        if train_data.truncated:
            print(f"[edgetune] {train_data.truncated} training rows truncated to --seq-len {cfg.seq_len}")
        torch.manual_seed(cfg.seed)
        model = add_lora(es.model, cfg.lora, spec)
        if eval_data is not None:
            metrics.eval_rows = len(eval_data.examples)
            metrics.eval_accuracy_before = evaluate(model, es.link, eval_data, es.pad_id, cfg.eval_batch,
                                                    metrics.eval, "eval before")
            print(f"[edgetune] eval accuracy before: {metrics.eval_accuracy_before:.4f}")
        metrics.steps = train_loop(model, es.link, train_data, es.pad_id, cfg)
        for record in metrics.steps:
            metrics.train.add(record.traffic)
        if eval_data is not None:
            metrics.eval_accuracy_after = evaluate(model, es.link, eval_data, es.pad_id, cfg.eval_batch,
                                                   metrics.eval, "eval after")
            print(f"[edgetune] eval accuracy after: {metrics.eval_accuracy_after:.4f}")
        es.link.stream.close()
        adapter_dir = cfg.out / "adapter"
        save_adapter(adapter_dir, adapter_state_dict(model, spec), peft_config(model, cfg.lora, spec, es.model_name))
        metrics.wall_s = time.perf_counter() - start
        summary = {k: v for k, v in metrics.as_dict().items() if k not in ("per_step", "settings")}
        meta = client.register_adapter(adapter_dir, AdapterMeta(mode=cfg.mode, base_model=es.model_name,
                                                                session_id=es.link.stream.session_id,
                                                                metrics_json=json.dumps(summary)))
    metrics.adapter_id = meta.adapter_id
    metrics.write(cfg.out / "metrics.json")
    return metrics


def train_loop(model: EdgeModel, link: MiddleLink, data: Dataset, pad_id: int, cfg: TrainConfig,
               params: list[torch.nn.Parameter] | None = None) -> list[StepRecord]:
    """``cfg.steps`` optimizer steps of ``params`` (default: the LoRA parameters) through ``link``."""
    params = params if params is not None else list(lora_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    batches = train_batches(data, cfg.batch_size, pad_id, cfg.seed)
    flops, records = FlopMeter(), []
    model.train()
    with tqdm(range(1, cfg.steps + 1), desc="train", unit="step") as bar:
        for step in bar:
            input_ids, labels = next(batches)
            traffic, t0 = Traffic(), time.perf_counter()
            with flops.measure():
                out = split_step(model, link, step, input_ids, labels, traffic)
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            wall = time.perf_counter() - t0
            tokens = int(input_ids.numel())
            records.append(StepRecord(step, out.loss, tokens, flops.last, out.compute_s, wall, traffic))
            bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tokens / wall:.0f}")
    return records
