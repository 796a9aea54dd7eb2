"""The edge recipes: ``train`` (split or dlora mode) and ``evaluate``, each setup -> work -> cleanup.

Offsite mode has its own recipe in :mod:`edge.modes.offsite`; it shares :class:`TrainConfig`,
:func:`evaluate` and :func:`train_loop` with this one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from edge.modes.dlora import DloraMiddle, LoraModules, SiteServer, plan_bank_sites
from edge.modes.kill_revive import KillRevive, KillReviveConfig
from edge.modes.split import MiddleLink, RemoteMiddle, StepOutput, score_examples, split_step
from edge.rpc.client import CloudCallError, CloudClient
from edge.training.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, peek_checkpoint, save_checkpoint
from edge.training.metrics import FlopMeter, RunMetrics, StepRecord
from edge.training.module_report import ModuleTally, module_rows, write_plot
from edge.training.run_state import progress_state, restore_progress
from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, peft_config, save_adapter
from emulator.adapters.lora_bank import LoraBank
from emulator.data.datasets import Dataset, load_eval, load_train, parse_eval, parse_train, train_batches
from emulator.data.scoring import accuracy
from emulator.model.bundle import load_edge_model
from emulator.model.loading import COMPUTE_DTYPES, load_tokenizer
from emulator.model.segments import EdgeModel
from emulator.privacy.defence import DefenceSettings
from protocol.accounting import Traffic
from protocol.channel import RETRYABLE, secure_channel
from protocol.retry import Backoff, retry
from protocol.tensors import WIRE_ALIASES, WIRE_DTYPES
from protocol.types import MODES, AdapterMeta, SessionInfo

TUNES = ("lora", "lora-top", "full")
WIRE_CHOICES = (*WIRE_ALIASES, *WIRE_DTYPES)


class ConfigError(ValueError):
    """Invalid training settings; lists every problem at once."""


def default_tune(mode: str, federated: bool) -> str:
    """What ``--tune`` means when it is not given (see ``TrainConfig.tune``)."""
    return "lora-top" if mode == "offsite" and not federated else "lora"


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
    kr: KillReviveConfig = field(default_factory=KillReviveConfig)
    eval_before: bool = True
    checkpoint_every: int = 50  # steps between checkpoints in RUN/checkpoint (0: none)
    resume: bool = False  # continue from RUN/checkpoint
    retries: int = 8  # attempts per step when the cloud is unreachable (capped, jittered backoff)
    # offsite: "lora" (LoRA on the adapter blocks), "lora-top" (LoRA on the top adapter blocks only; the bottom
    # blocks' LoRA stays zero) or "full" (the adapter blocks' weights). Empty: the mode's default, "lora-top"
    # for a single offsite run (the best plug-in of docs/offsite_benchmark.md, and the fastest), "lora" otherwise
    # (split, dlora and FedAvg rounds, which average LoRA on both adapter ends)
    tune: str = ""
    emulator_layers: int = 0  # offsite: emulator depth E (0: the cloud's default)
    emulator_dtype: str = "float32"  # offsite: dtype the frozen emulator runs in (float32 or bfloat16)
    federated: bool = False  # offsite: join the cloud's FedAvg job instead of a single run
    # On the bottom-cut state (docs/security.md): noise and NoPeek, off by default
    defence: DefenceSettings = field(default_factory=DefenceSettings)

    def __post_init__(self) -> None:
        if not self.tune:
            object.__setattr__(self, "tune", default_tune(self.mode, self.federated))
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        problems += self.kr.problems()
        if self.defence.active and self.mode == "offsite":
            problems.append("--defence-noise and --defence-nopeek protect the state sent at the cut: offsite mode "
                            "sends none (use --mode split or dlora)")
        if self.kr.enabled and self.mode != "dlora":
            problems.append(f"--kr-budget {self.kr.budget}: Kill-and-Revive needs --mode dlora")
        if self.tune not in TUNES:
            problems.append(f"--tune {self.tune!r}: choose one of {', '.join(TUNES)}")
        if self.mode != "offsite" and (self.tune != "lora" or self.federated or self.emulator_layers
                                       or self.emulator_dtype != "float32"):
            problems.append("--tune lora-top/full, --federated, --emulator-layers and --emulator-dtype need "
                            "--mode offsite")
        if self.emulator_dtype not in COMPUTE_DTYPES:
            problems.append(f"--emulator-dtype {self.emulator_dtype!r}: choose from {', '.join(COMPUTE_DTYPES)}")
        if self.federated and self.tune != "lora":
            problems.append(f"--federated rounds average LoRA on both adapter ends; drop --tune {self.tune}")
        for name, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--lora-rank", self.lora.rank), ("--eval-batch", self.eval_batch)):
            if value < 1:
                problems.append(f"{name} {value}: must be at least 1")
        if self.seq_len < 2:
            problems.append(f"--seq-len {self.seq_len}: must be at least 2")
        if self.checkpoint_every < 0 or self.retries < 1:
            problems.append("--checkpoint-every must be >= 0 and --retries >= 1")
        if self.resume and not (self.out / CHECKPOINT / "state.json").is_file():
            problems.append(f"--resume {self.out}: no checkpoint there ({self.out / CHECKPOINT} is missing)")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: must be positive")
        if WIRE_ALIASES.get(self.wire_dtype, self.wire_dtype) not in WIRE_DTYPES:
            problems.append(f"--wire-dtype {self.wire_dtype!r}: choose one of {', '.join(WIRE_CHOICES)}")
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
    info: SessionInfo | None = None
    bundle: Path | None = None


def open_edge_session(client: CloudClient, edge_layers: int, wire_dtype: str, mode: str = "split",
                      lora_targets: tuple[str, ...] = ()) -> EdgeSession:
    """Opens a session (dlora: for ``lora_targets``), fetches the bundle and opens the training stream."""
    info = client.open_session(mode, edge_layers, lora_targets if mode == "dlora" else ())
    bundle = client.bundle(info)
    tokenizer = load_tokenizer(bundle)
    model = load_edge_model(bundle)
    link = RemoteMiddle(client.train_stream(info), wire_dtype)
    return EdgeSession(client, model, link, tokenizer, info.model.model_name, tokenizer.pad_token_id, info, bundle)


def dlora_link(es: EdgeSession, settings: LoraSettings, wire_dtype: str) -> DloraMiddle:
    """The dlora link of a session: a LoRA bank for every cloud-held site, on the session's stream."""
    assert es.bundle is not None and es.info is not None
    groups = plan_bank_sites(es.bundle, settings.resolved_targets(es.model.bottom.spec), es.info.remote_sites)
    return DloraMiddle(es.link.stream, SiteServer(LoraBank(groups, settings)), wire_dtype)


def evaluate(model: EdgeModel, link: MiddleLink, data: Dataset, pad_id: int, batch: int,
             traffic: Traffic, desc: str = "eval", defence: DefenceSettings | None = None) -> float:
    """Accuracy of ``model`` on a multiple-choice dataset by split inference (with ``defence`` on the
    states it sends)."""
    model.eval()
    return accuracy(data.examples, lambda chunk: score_examples(model, link, chunk, pad_id, traffic, defence),
                    batch, desc)


def start_run(cfg: TrainConfig) -> RunMetrics:
    """The set-up every training recipe shares: threads, the data checked before touching the network,
    and the run's metrics with its settings."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    parse_train(cfg.data)
    if cfg.eval is not None:
        parse_eval(cfg.eval)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    return RunMetrics(mode=cfg.mode, settings=settings)


def train(cfg: TrainConfig) -> RunMetrics:
    """Runs ``edgetune-edge train``: returns the metrics it also writes to ``RUN/metrics.json``."""
    start = time.perf_counter()
    metrics = start_run(cfg)
    with secure_channel(cfg.cloud, cfg.identity) as channel:
        client = CloudClient(channel, metrics.setup)
        es = open_edge_session(client, cfg.edge_layers, cfg.wire_dtype, cfg.mode, cfg.lora.targets)
        spec = es.model.bottom.spec
        train_data = load_train(cfg.data, es.tokenizer, cfg.seq_len)
        eval_data = load_eval(cfg.eval, es.tokenizer, cfg.seq_len) if cfg.eval else None
        metrics.train_rows, metrics.truncated_rows = len(train_data.examples), train_data.truncated
        if train_data.truncated:
            print(f"[edgetune] {train_data.truncated} training rows truncated to --seq-len {cfg.seq_len}")
        torch.manual_seed(cfg.seed)
        model = add_lora(es.model, cfg.lora, spec)
        link: RemoteMiddle | DloraMiddle = dlora_link(es, cfg.lora, cfg.wire_dtype) if cfg.mode == "dlora" else es.link
        modules = LoraModules(model, spec, link.server if isinstance(link, DloraMiddle) else None)
        resumed = peek_checkpoint(cfg.out) if cfg.resume else None
        if resumed is not None:
            metrics.eval_accuracy_before = resumed.extra.get("eval_accuracy_before")
        elif eval_data is not None and cfg.eval_before:
            metrics.eval_rows = len(eval_data.examples)
            metrics.eval_accuracy_before = evaluate(model, link, eval_data, es.pad_id, cfg.eval_batch,
                                                    metrics.eval, "eval before", cfg.defence)
            print(f"[edgetune] eval accuracy before: {metrics.eval_accuracy_before:.4f}")
        def reconnect() -> None:  # a fresh stream on the same session (the cloud may have restarted)
            assert es.info is not None
            link.stream = client.train_stream(es.info)

        extra = {"eval_accuracy_before": metrics.eval_accuracy_before, "session_id": link.stream.session_id}
        metrics.steps, tally, kr = _train_loop(model, link, modules, train_data, es.pad_id, cfg, reconnect, extra)
        for record in metrics.steps:
            metrics.train.add(record.traffic)
        metrics.modules = module_rows(tally, kr, link.ledger if isinstance(link, DloraMiddle) else None)
        metrics.kr_events = [dataclasses.asdict(e) for e in kr.events]
        if eval_data is not None:
            metrics.eval_rows = len(eval_data.examples)
            metrics.eval_accuracy_after = evaluate(model, link, eval_data, es.pad_id, cfg.eval_batch,
                                                   metrics.eval, "eval after", cfg.defence)
            print(f"[edgetune] eval accuracy after: {metrics.eval_accuracy_after:.4f}")
        link.stream.close()
        adapter_dir = cfg.out / "adapter"
        _save_adapter(adapter_dir, model, link, cfg.lora, es.model_name, cfg.defence)
        metrics.wall_s = time.perf_counter() - start
        summary = {k: v for k, v in metrics.as_dict().items() if k not in ("per_step", "settings", "per_module")}
        summary["defence"] = cfg.defence.as_dict()
        meta = client.register_adapter(adapter_dir, AdapterMeta(mode=cfg.mode, base_model=es.model_name,
                                                                session_id=link.stream.session_id,
                                                                metrics_json=json.dumps(summary)))
    metrics.adapter_id = meta.adapter_id
    metrics.write(cfg.out / "metrics.json")
    write_plot(metrics.steps, cfg.out / "metrics.png", f"{cfg.mode}: active LoRA modules and bytes per step")
    return metrics


def _resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must agree with to be resumed (paths and threads may differ)."""
    keep = ("mode", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "schedule", "clip", "edge_layers",
            "lora", "wire_dtype", "seed", "kr", "tune", "emulator_layers", "emulator_dtype", "defence")
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k in keep}, default=str))


def _resilient_step(run: Callable[[], StepOutput], flops: FlopMeter, optimizer: torch.optim.Optimizer,
                    reconnect: Callable[[], None] | None, attempts: int) -> StepOutput:
    """Runs one step; if the cloud is unreachable, waits (the one backoff policy, :mod:`protocol.retry`),
    reconnects to the same session and runs the whole step again from clean gradients, so the result is
    unchanged."""

    def measured() -> StepOutput:
        with flops.measure():
            return run()

    def before_retry(err: BaseException, delay: float) -> None:
        assert isinstance(err, CloudCallError)
        optimizer.zero_grad(set_to_none=True)
        code = err.code.name if err.code is not None else "no status"
        print(f"[edgetune] cloud unreachable ({code}); retrying the step in {delay:.1f} s", flush=True)

    def after_wait(delay: float) -> None:
        time.sleep(delay)
        if reconnect is not None:
            reconnect()

    # A step waits longer than one RPC (0.5 s base, 10 s cap): the cloud may be restarting.
    return retry(measured, lambda err: isinstance(err, CloudCallError) and err.code in RETRYABLE,
                 Backoff(attempts, base_s=0.5, cap_s=10.0), before_retry, after_wait)


def _save_adapter(directory: Path, model: EdgeModel, link: MiddleLink, settings: LoraSettings,
                  model_name: str, defence: DefenceSettings | None = None) -> None:
    """One PEFT adapter with every module: the segments' and, in dlora, the bank's cloud-held sites;
    the defence it was trained with goes into the weights file's metadata (the registry keeps it)."""
    spec = model.bottom.spec
    state, extra = adapter_state_dict(model, spec), []
    if isinstance(link, DloraMiddle):
        state.update(link.server.bank.adapter_state_dict())
        extra = [site.name for site in link.server.bank.sites]
    meta = {"edgetune_defence": json.dumps(defence.as_dict())} if defence is not None else None
    save_adapter(directory, state, peft_config(model, settings, spec, model_name, extra_targets=extra), meta)


def train_loop(model: EdgeModel, link: MiddleLink, data: Dataset, pad_id: int, cfg: TrainConfig,
               params: list[torch.nn.Parameter] | None = None) -> list[StepRecord]:
    """``cfg.steps`` optimizer steps of ``params`` (default: the LoRA parameters) through ``link``,
    with checkpoints and ``--resume`` like every mode (offsite uses it with its local emulator)."""
    modules = LoraModules(model, model.bottom.spec)
    if params is not None:  # e.g. offsite --tune lora-top: the frozen bottom LoRA stays frozen
        modules.only(params)
    named = {f"param#{i}": p for i, p in enumerate(params)} if params is not None else None
    records, _, _ = _train_loop(model, link, modules, data, pad_id, cfg, named=named)
    return records


def _train_loop(model: EdgeModel, link: MiddleLink, modules: LoraModules, data: Dataset, pad_id: int,
                cfg: TrainConfig, reconnect: Callable[[], None] | None = None,
                extra: dict[str, Any] | None = None,
                named: dict[str, torch.nn.Parameter] | None = None) -> tuple[list[StepRecord], ModuleTally, KillRevive]:
    extra = extra or {}
    named = named or {f"{name}#{i}": p for name in modules.names for i, p in enumerate(modules.parameters(name))}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    kr, tally = KillRevive(modules.names, cfg.kr), ModuleTally(modules, cfg.lora.rank)
    flops, records, done = FlopMeter(), [], 0
    settings = _resume_settings(cfg)
    if cfg.resume:
        state = load_checkpoint(cfg.out, named, optimizer, scheduler, settings)
        done, records = state.step, [StepRecord.from_dict(r) for r in state.records]
        print(f"[edgetune] resuming {cfg.out} after step {done}", flush=True)
        restore_progress(kr, tally, state.extra)
    batches = train_batches(data, cfg.batch_size, pad_id, cfg.seed)
    for _ in range(done):  # the data position: the same batches in the same order as an unbroken run
        next(batches)
    model.train()
    with tqdm(range(done + 1, cfg.steps + 1), desc="train", unit="step", initial=done, total=cfg.steps) as bar:
        for step in bar:
            plan = kr.plan(step)
            modules.set_active(plan.active)
            input_ids, labels = next(batches)
            traffic, t0 = Traffic(), time.perf_counter()
            out = _resilient_step(partial(split_step, model, link, step, input_ids, labels, traffic, cfg.defence),
                                  flops, optimizer, reconnect, cfg.retries if reconnect else 1)
            kr.observe(step, plan, modules.importance(cfg.kr.score))
            if plan.probe:  # a module the probe (re)killed is measured, not trained
                modules.drop_grads(frozenset(plan.active) - kr.active)
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            wall = time.perf_counter() - t0
            tokens = int(input_ids.numel())
            sites = max(traffic.round_trips - 2, 0)  # offsite's local emulator makes no round trip at all
            records.append(StepRecord(step, out.loss, tokens, flops.last, out.compute_s, wall, traffic,
                                      len(plan.active), sites, tally.add(plan.active, tokens), plan.probe))
            bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{tokens / wall:.0f}", active=len(plan.active))
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                save_checkpoint(cfg.out, named, optimizer, scheduler, Checkpoint(
                    step, str(extra.get("session_id", "")), settings, {**extra, **progress_state(kr, tally)},
                    [r.as_record() for r in records]))
    modules.set_active(frozenset(modules.names))  # inference, like the saved adapter, computes every module
    return records, tally, kr
