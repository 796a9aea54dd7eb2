"""Offsite-Tuning on the edge: download once, train offline against the emulator, upload the adapter.

The recipe holds a channel to the cloud only around its network phases: opening the session and
downloading the bundle, then (after training, with no channel open) uploading the adapter. The
emulator is run in-process through :class:`edge.modes.split.LocalMiddle`, so an offsite step is exactly a
split step whose middle is the emulator instead of the cloud. Federated rounds repeat
pull global -> train offline -> submit until the cloud's job is finished.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import torch
from transformers import PreTrainedTokenizerBase

from edge.modes.split import LocalMiddle, RemoteMiddle
from edge.rpc.client import CloudClient
from edge.training.metrics import RunMetrics
from edge.training.recipes import TrainConfig, evaluate, start_run, train_loop
from emulator.adapters.lora import adapter_state_dict, add_lora, lora_parameters, peft_config, save_adapter
from emulator.adapters.plugin import apply_to_edge, block_parameters, delta_state_dict, lora_settings_of, save_delta
from emulator.data.datasets import Dataset, load_eval, load_train, parse_eval
from emulator.model.arch import ArchSpec
from emulator.model.bundle import load_edge_model, load_emulator, read_plan
from emulator.model.loading import compute_dtype, load_tokenizer
from emulator.model.segments import BlockStack, EdgeModel
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from protocol.types import AdapterMeta, RoundTask

Connect = Callable[[str, Path], AbstractContextManager[grpc.Channel]]


@dataclass
class OffsiteKit:
    """What an offsite bundle gives the edge: its segments, the emulator, the tokenizer."""

    edge: EdgeModel
    emulator: BlockStack
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    model_name: str
    bundle_meta: dict

    @property
    def spec(self) -> ArchSpec:
        return self.edge.bottom.spec

    def link(self) -> LocalMiddle:
        return LocalMiddle(self.emulator)


# Measured in docs/offsite.md (SmolLM2-135M, 2-8-2, Rotten Tomatoes): layer drop alone 0.489 zero-shot, below
# the majority class (0.593); a distilled emulator is what an adapter trained offsite can transfer from.
UNDISTILLED_WARNING = ("[edgetune] warning: the cloud's emulator is uniform layer drop, not distilled (0.489 zero-shot "
                       "in docs/offsite.md, below the majority class's 0.593), so this adapter may learn little that "
                       "transfers to the full model; ask the model owner for `edgetune-cloud emulator build "
                       "--distill-data speeches`")


def layer_drop_only(emulator_meta: dict) -> bool:
    """Whether a bundle's emulator is uniform layer drop and nothing else: neither distilled nor fitted to the
    model by block selection or bridges (see :mod:`emulator.offsite.select`)."""
    return (not emulator_meta.get("distilled") and emulator_meta.get("selection", "uniform") == "uniform"
            and not emulator_meta.get("bridge_rank"))


def load_kit(bundle: Path, emulator_dtype: torch.dtype = torch.float32) -> OffsiteKit:
    """The bundle's segments (fp32, trained) and its frozen emulator in ``emulator_dtype``: bf16 halves
    the emulator's memory and, on CPUs with bf16 units, makes its forward and backward faster."""
    tokenizer = load_tokenizer(bundle)
    _, meta = read_plan(bundle)
    emulator = load_emulator(bundle).to(emulator_dtype).requires_grad_(False)
    return OffsiteKit(load_edge_model(bundle), emulator, tokenizer, tokenizer.pad_token_id, meta["model_name"], meta)


def download(cfg: TrainConfig, connect: Connect, traffic: Traffic) -> OffsiteKit:
    """Opens an offsite session and downloads its bundle (cached by content hash)."""
    with connect(cfg.cloud, cfg.identity) as channel:
        client = CloudClient(channel, traffic)
        info = client.open_session("offsite", cfg.edge_layers, emulator_layers=cfg.emulator_layers, traffic=traffic)
        return load_kit(client.bundle(info), compute_dtype(cfg.emulator_dtype))


def trainable(edge: EdgeModel, spec: ArchSpec, cfg: TrainConfig) -> tuple[EdgeModel, list[torch.nn.Parameter]]:
    """The model to train and its trainable parameters (``edge`` is left as it is): LoRA of the top blocks
    only (default; the bottom blocks' LoRA stays zero and frozen, so the adapter keeps the usual format),
    LoRA on both adapter ends, or the adapter blocks' weights."""
    torch.manual_seed(cfg.seed)
    if cfg.tune in ("lora", "lora-top"):
        model = cast(EdgeModel, add_lora(edge, cfg.lora, spec))
        lora = lora_parameters(model)
        if cfg.tune == "lora-top":
            for name, param in lora.items():
                param.requires_grad_(name.startswith("top."))
        return model, [p for p in lora.values() if p.requires_grad]
    model = copy.deepcopy(edge).requires_grad_(False)
    params = list(block_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    return model, params


def save_trained(model: EdgeModel, kit: OffsiteKit, cfg: TrainConfig, directory: Path) -> Path:
    """Writes the adapter: PEFT LoRA, or the adapter blocks' delta for ``--tune full``."""
    if cfg.tune != "full":
        save_adapter(directory, adapter_state_dict(model, kit.spec), peft_config(model, cfg.lora, kit.spec,
                                                                                 kit.model_name))
    else:
        save_delta(directory, delta_state_dict(model, kit.edge, kit.spec), kit.model_name)
    return directory


def train_offsite(cfg: TrainConfig, connect: Connect = secure_channel) -> RunMetrics:
    """Runs ``edgetune-edge train --mode offsite``; returns the metrics it writes to ``RUN/metrics.json``."""
    start = time.perf_counter()
    metrics = start_run(cfg)
    kit = download(cfg, connect, metrics.setup)
    train_data = load_train(cfg.data, kit.tokenizer, cfg.seq_len)
    eval_data = load_eval(cfg.eval, kit.tokenizer, cfg.seq_len) if cfg.eval else None
    metrics.train_rows, metrics.truncated_rows = len(train_data.examples), train_data.truncated
    metrics.extra["emulator"] = kit.bundle_meta.get("emulator", {})
    if layer_drop_only(metrics.extra["emulator"]):
        print(UNDISTILLED_WARNING, file=sys.stderr, flush=True)
    if cfg.federated:
        meta = _federated(cfg, kit, train_data, eval_data, metrics, connect)
    else:
        meta = _single(cfg, kit, train_data, eval_data, metrics, connect, start)
    metrics.adapter_id = meta.adapter_id
    metrics.wall_s = time.perf_counter() - start
    metrics.write(cfg.out / "metrics.json")
    return metrics


def _single(cfg: TrainConfig, kit: OffsiteKit, data: Dataset, eval_data: Dataset | None, metrics: RunMetrics,
            connect: Connect, start: float) -> AdapterMeta:
    """Plain Offsite-Tuning: one client, one round; no channel is open while training."""
    model, params = trainable(kit.edge, kit.spec, cfg)
    if cfg.eval_before:
        _evaluate_emulator(model, kit, eval_data, cfg, metrics, "eval_accuracy_before")
    metrics.steps = train_loop(model, kit.link(), data, kit.pad_id, cfg, params)
    _evaluate_emulator(model, kit, eval_data, cfg, metrics, "eval_accuracy_after")
    adapter_dir = save_trained(model, kit, cfg, cfg.out / "adapter")
    metrics.wall_s = time.perf_counter() - start
    summary = {k: v for k, v in metrics.as_dict().items() if k not in ("per_step", "settings")}
    meta = AdapterMeta(mode="offsite", base_model=kit.model_name, num_examples=len(data.examples),
                       metrics_json=json.dumps(summary))
    with connect(cfg.cloud, cfg.identity) as channel:
        return CloudClient(channel).register_adapter(adapter_dir, meta, metrics.upload)


def _federated(cfg: TrainConfig, kit: OffsiteKit, data: Dataset, eval_data: Dataset | None,
               metrics: RunMetrics, connect: Connect) -> AdapterMeta:
    """FedAvg rounds: pull the global adapter, train offline, submit; at the end pull the final one."""
    if cfg.eval_before:
        _evaluate_emulator(kit.edge, kit, eval_data, cfg, metrics, "eval_accuracy_before")
    after, rounds = 0, []
    while True:
        with connect(cfg.cloud, cfg.identity) as channel:
            client = CloudClient(channel, metrics.setup)
            task = client.next_round(after)
            if task.finished:
                client.pull_adapter(task.global_adapter_id, cfg.out / "adapter", metrics.setup)
                break
            if not task.round:
                continue
            global_dir = cfg.out / "rounds" / f"round-{task.round}-global"
            client.pull_adapter(task.global_adapter_id, global_dir, metrics.setup)
        update, record = _local_round(cfg, kit, data, global_dir, task, metrics)
        meta = AdapterMeta(mode="offsite", base_model=kit.model_name, job_id=task.job_id, round=task.round,
                           num_examples=len(data.examples))
        with connect(cfg.cloud, cfg.identity) as channel:
            CloudClient(channel).submit_update(update, meta, metrics.upload)
        rounds.append(record)
        after = task.round
    final = apply_to_edge(kit.edge, cfg.out / "adapter", kit.spec)
    _evaluate_emulator(final, kit, eval_data, cfg, metrics, "eval_accuracy_after")
    metrics.extra.update(job_id=task.job_id, rounds=rounds)
    return AdapterMeta(mode="offsite", base_model=kit.model_name, adapter_id=task.global_adapter_id)


def _local_round(cfg: TrainConfig, kit: OffsiteKit, data: Dataset, global_dir: Path, task: RoundTask,
                 metrics: RunMetrics) -> tuple[Path, dict]:
    model = apply_to_edge(kit.edge, global_dir, kit.spec)
    round_cfg = dataclasses.replace(cfg, steps=task.local_steps, seed=cfg.seed + 1000 * task.round,
                                    lora=lora_settings_of(global_dir))
    steps = train_loop(model, kit.link(), data, kit.pad_id, round_cfg)
    metrics.steps.extend(steps)
    update = save_trained(model, kit, round_cfg, cfg.out / "rounds" / f"round-{task.round}-update")
    return update, {"round": task.round, "steps": len(steps), "loss_first": steps[0].loss,
                    "loss_last": steps[-1].loss}


def _evaluate_emulator(model: EdgeModel, kit: OffsiteKit, data: Dataset | None, cfg: TrainConfig,
                       metrics: RunMetrics, field: str) -> None:
    """Emulator accuracy (local, offline) into ``metrics.<field>``."""
    if data is None:
        return
    metrics.eval_rows = len(data.examples)
    accuracy = evaluate(model, kit.link(), data, kit.pad_id, cfg.eval_batch, Traffic(), f"emulator {field[14:]}")
    setattr(metrics, field, accuracy)
    print(f"[edgetune] emulator eval accuracy {field[14:]}: {accuracy:.4f}")


@dataclass(frozen=True)
class OffsiteEval:
    emulator_zero_shot: float
    emulator_adapter: float | None
    plug_in: float | None
    rows: int
    traffic: Traffic


def evaluate_offsite(cloud: str, identity: Path, data_path: Path, adapter: Path | None, edge_layers: int,
                     emulator_layers: int, seq_len: int, batch: int, connect: Connect = secure_channel,
                     emulator_dtype: torch.dtype = torch.float32) -> OffsiteEval:
    """Emulator zero-shot and emulator + adapter (locally), and the plug-in (full model + adapter) by
    split inference against the cloud's full middle: the adapter blocks are the edge blocks of split mode."""
    parse_eval(data_path)
    traffic = Traffic()
    with connect(cloud, identity) as channel:
        client = CloudClient(channel)
        info = client.open_session("offsite", edge_layers, emulator_layers=emulator_layers)
        kit = load_kit(client.bundle(info), emulator_dtype)
        data = load_eval(data_path, kit.tokenizer, seq_len)
        zero = evaluate(kit.edge, kit.link(), data, kit.pad_id, batch, Traffic(), "emulator zero-shot")
        if adapter is None:
            return OffsiteEval(zero, None, None, len(data.examples), traffic)
        tuned = apply_to_edge(kit.edge, adapter, kit.spec).eval()
        with_adapter = evaluate(tuned, kit.link(), data, kit.pad_id, batch, Traffic(), "emulator + adapter")
        split = client.open_session("split", info.model.edge_layers)
        link = RemoteMiddle(client.train_stream(split))
        with torch.no_grad():
            plug = evaluate(tuned, link, data, kit.pad_id, batch, traffic, "plug-in (split inference)")
        link.stream.close()
    return OffsiteEval(zero, with_adapter, plug, len(data.examples), traffic)
