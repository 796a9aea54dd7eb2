"""``edgetune-edge``: train, evaluate, list and pull adapters from an edge device.

torch, transformers and peft are imported inside the command functions only, so ``--help`` and
argument errors answer at once; every check that needs no model runs before them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core logs handshake details; we explain them instead

from edge.modes.kill_revive import KillReviveConfig  # pure Python: cheap to import
from protocol.fileio import publish_directory

# The parser must not import torch, so the defaults that the config dataclasses (TrainConfig,
# LoraSettings, DefenceSettings: all in torch-importing modules) also hold are restated here;
# tests/edge/test_cli.py fails if the two ever disagree.
MODES = ("split", "dlora", "offsite")
TUNES = ("lora", "lora-top", "full")
WIRE_CHOICES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16", "int8")
COMPUTE_CHOICES = ("float32", "bfloat16")
TRAIN_DEFAULTS: dict[str, Any] = {"steps": 200, "batch_size": 8, "seq_len": 64, "lr": 2e-4, "warmup_steps": 20,
                  "schedule": "constant_with_warmup", "clip": 1.0, "eval_batch": 32, "checkpoint_every": 50,
                  "retries": 8}
LORA_RANK, LORA_ALPHA = 8, 16
DEFAULT_WIRE = {"split": "float32", "dlora": "int8", "offsite": "float32"}  # from docs/dlora_benchmark.md
# dlora trains LoRA on every block from zero-initialised B: at split's lr 2e-4 a short run learns
# nothing, and 20 warm-up steps would fill a 20-step run (issue 14; the README's dlora recipe uses 1e-3).
DLORA_LR = 1e-3


class UsageError(ValueError):
    """A mistake in the command line found before any model is loaded; the message names the flag and the fix."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option's help, except where there is no default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cloud", required=True, help="coordinator HOST:PORT")
    p.add_argument("--identity", type=Path, required=True, help="DIR/clients/NAME from `pki issue`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgetune-edge", description="edgetune edge client", formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub.add_parser("train", help="fine-tune LoRA on local data with the cloud's backbone",
                                 formatter_class=_Help))
    e = sub.add_parser("eval", help="accuracy on an evaluation JSONL by split inference", formatter_class=_Help)
    _connection(e)
    e.add_argument("--data", type=Path, required=True, help="evaluation JSONL (prompt/choices/answer)")
    e.add_argument("--adapter", type=Path, help="PEFT adapter directory (default: the base model)")
    e.add_argument("--mode", default="split", choices=MODES,
                   help="the mode the adapter was trained in; offsite: emulator zero-shot, emulator + adapter, "
                        "and plug-in by split inference")
    e.add_argument("--edge-layers", type=int, default=0,
                   help="K blocks at each end, as in training (0: the cloud's default)")
    e.add_argument("--emulator-layers", type=int, default=0, help="offsite: emulator depth E (0: the cloud's)")
    e.add_argument("--emulator-dtype", default="float32", choices=COMPUTE_CHOICES,
                   help="offsite: dtype the frozen emulator runs in")
    e.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS["seq_len"],
                   help="prompts are cut from the left to fit")
    e.add_argument("--eval-batch", type=int, default=TRAIN_DEFAULTS["eval_batch"], help="rows per forward pass")
    from edge.runtime.cli import add_commands, add_eval_runtime  # argparse only: cheap

    add_eval_runtime(e)
    ls = sub.add_parser("list", help="list the adapters this identity owns", formatter_class=_Help)
    _connection(ls)
    pl = sub.add_parser("pull", help="download an adapter this identity owns (PEFT format)", formatter_class=_Help)
    _connection(pl)
    pl.add_argument("--adapter", required=True, help="adapter id (`edgetune-edge list`)")
    pl.add_argument("--out", type=Path, required=True, help="new directory for the adapter (never overwritten)")
    bm = sub.add_parser("base-model", help="write the base model as a local Hugging Face directory, to load "
                                           "pulled adapters on with PEFT", formatter_class=_Help)
    bm.add_argument("--model", default="smollm2-135m",
                    help="built-in model name (the cloud's `serve --model`) or a local HF directory")
    bm.add_argument("--out", type=Path, required=True, help="new directory (never overwritten)")
    add_commands(sub, _Help)
    return parser


def _train_parser(t: argparse.ArgumentParser) -> None:
    _connection(t)
    d = TRAIN_DEFAULTS
    t.add_argument("--data", type=Path, required=True, help="training JSONL (prompt/completion or text)")
    t.add_argument("--eval", type=Path, help="evaluation JSONL (prompt/choices/answer)")
    t.add_argument("--out", type=Path, help="new run directory (adapter/, metrics.json, checkpoint/); an existing "
                                            "non-empty one needs --resume or --force")
    t.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the interrupted run in RUN from its last checkpoint (same flags otherwise)")
    t.add_argument("--force", action="store_true", help="delete an existing --out run directory and start afresh")
    t.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="steps between checkpoints (0: none)")
    t.add_argument("--retries", type=int, default=d["retries"], help="attempts per step while the cloud is unreachable")
    t.add_argument("--mode", default="split", choices=MODES,
                   help="split: LoRA on the edge-held blocks, the cloud runs the middle every step; dlora: LoRA "
                        "on every block, all kept on the edge; offsite: train offline against an emulator")
    t.add_argument("--tune", default="", choices=TUNES,
                   help="offsite: lora-top (default): LoRA on the top adapter blocks only (no backward through "
                        "the emulator; in docs/offsite.md the best mean plug-in, never below zero-shot on the default "
                        "emulator); lora: LoRA on both adapter ends (the default of --federated rounds); "
                        "full: full tuning of the adapter blocks")
    t.add_argument("--emulator-layers", type=int, default=0, help="offsite: emulator depth E (0: the cloud's)")
    t.add_argument("--emulator-dtype", default="float32", choices=COMPUTE_CHOICES,
                   help="offsite: dtype the frozen emulator runs in (bfloat16: half its memory, faster on CPUs "
                        "with bf16 units; the adapter still trains in fp32)")
    t.add_argument("--federated", action="store_true", help="offsite: join the cloud's FedAvg rounds")
    t.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=d["batch_size"], help="training rows per step")
    t.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per row (prompts cut from the left)")
    t.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default: {d['lr']:g}; {DLORA_LR:g} in dlora)")
    t.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps (default: {d['warmup_steps']}; in dlora min({d['warmup_steps']}, "
                        "steps/10))")
    t.add_argument("--schedule", default=d["schedule"], help="transformers scheduler name")
    t.add_argument("--clip", type=float, default=d["clip"], help="gradient-norm clip (0: off)")
    t.add_argument("--edge-layers", type=int, default=0, help="K blocks at each end (0: the cloud's default)")
    t.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank r")
    t.add_argument("--lora-alpha", type=int, default=LORA_ALPHA, help="LoRA alpha (scale alpha/r)")
    t.add_argument("--lora-targets", default=None,
                   help="comma-separated projection names, 'all' (every linear layer of a block), or '' for "
                        "the architecture's default (q/v for LLaMA); default: 'all' in split mode, '' in dlora "
                        "(every cloud-held site costs exchanges)")
    t.add_argument("--wire-dtype", default=None, choices=WIRE_CHOICES,
                   help="dtype of every tensor crossing the wire (int8: per-token absmax scaling); default: "
                        "fp32 in split mode, int8 in dlora (measured: 3.97x fewer bytes, no accuracy loss; "
                        "docs/dlora_benchmark.md)")
    _kr_flags(t)
    t.add_argument("--defence-noise", type=float, default=0.0, metavar="S",
                   help="split/dlora: Gaussian noise on the state sent at the cut, std S x each position's RMS "
                        "(0: off; measured leakage in docs/security.md)")
    t.add_argument("--defence-nopeek", type=float, default=0.0, metavar="W",
                   help="split/dlora: NoPeek, W x distance correlation between token embeddings and the sent "
                        "state added to the loss (0: off)")
    t.add_argument("--no-eval-before", action="store_true", help="skip the evaluation before training")
    t.add_argument("--eval-batch", type=int, default=d["eval_batch"], help="evaluation rows per forward pass")
    t.add_argument("--seed", type=int, default=0, help="seed of LoRA initialisation and data order")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")


def _kr_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--kr-budget", type=float, default=KillReviveConfig.budget,
                   help="dlora Kill-and-Revive: fraction of LoRA modules kept active (1.0: all, KR off)")
    t.add_argument("--kr-probe-every", type=int, default=KillReviveConfig.probe_every,
                   help="a probe step computing every module every N steps (revives modules that matter again)")
    t.add_argument("--kr-ema", type=float, default=KillReviveConfig.ema, help="moving-average factor of the score")
    t.add_argument("--kr-score", default=KillReviveConfig.score, choices=["grad", "taylor"],
                   help="module importance: gradient norm, or |<dL/dB, B>| (the loss change of removing it)")
    t.add_argument("--kr-warmup", type=int, default=KillReviveConfig.warmup,
                   help="steps that train every module before the first kill (the first ranking averages them)")


def check_address(address: str) -> None:
    """``--cloud`` must be HOST:PORT with a port in 1..65535 (``[::1]:PORT`` for IPv6)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--cloud {address!r}: expected HOST:PORT, e.g. cloud.example.org:50051")


def run_dir(out: Path | None, resume: Path | None, force: bool) -> Path:
    """The run directory ``train`` writes, refusing to replace an existing run silently.

    Convention: ``--out RUN`` must be new (or empty); ``--resume RUN`` continues RUN in place;
    ``--force`` deletes an existing ``--out`` first.
    """
    if resume is not None:
        if force:
            raise UsageError("--resume continues a run and --force replaces it: give one of them")
        if out is not None and out.resolve() != resume.resolve():
            raise UsageError(f"--resume {resume} continues the run in place; drop --out {out} (or give the same "
                             "directory)")
        return resume
    if out is None:
        raise UsageError("give --out RUN (or --resume RUN to continue an interrupted run)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; give a new directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: already holds a run; pass --resume {out} to continue it, --force to replace "
                         "it, or a new directory")
    return out


def finished_adapter(run: Path) -> str | None:
    """The adapter id a finished run registered (``RUN/metrics.json``), or None."""
    try:
        return json.loads((run / "metrics.json").read_text()).get("adapter_id") or None
    except (OSError, ValueError, AttributeError):
        return None


def _check_targets(raw: str) -> tuple[str, ...]:
    """``--lora-targets`` as names, each known to the architecture table (checked again against the model)."""
    from emulator.model.arch import ARCHITECTURES

    targets = tuple(t.strip() for t in raw.split(",") if t.strip())
    known = sorted({n for spec in ARCHITECTURES.values() for n in (*spec.all_linear, *spec.lora_targets)})
    unknown = [t for t in targets if t not in known and t != "all"]
    if unknown or ("all" in targets and len(targets) > 1):
        raise UsageError(f"--lora-targets {raw!r}: {', '.join(unknown) or 'all'} is not a projection name; give "
                         f"'all', '' (the architecture's default) or names from {', '.join(known)}")
    return targets


def _check_schedule(name: str) -> None:
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise UsageError(f"--schedule {name!r}: choose one of {', '.join(names)}")


def _train(args: argparse.Namespace) -> None:
    check_address(args.cloud)
    out = run_dir(args.out, args.resume, args.force)
    done = finished_adapter(out) if args.resume is not None else None
    if done is not None:
        print(f"run {out} already finished and registered adapter {done}; nothing to resume")
        return
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be 0 (torch's default) or more")
    raw = args.lora_targets if args.lora_targets is not None else ("" if args.mode == "dlora" else "all")
    targets = _check_targets(raw)
    _check_schedule(args.schedule)
    cfg = _train_config(args, out, targets)
    if args.force and out.is_dir():
        shutil.rmtree(out)
    from edge.modes.offsite import train_offsite
    from edge.training.recipes import train

    metrics = train_offsite(cfg) if cfg.mode == "offsite" else train(cfg)
    print(f"adapter {metrics.adapter_id} registered; files in {out / 'adapter'}, "
          f"metrics in {out / 'metrics.json'}")


def _train_config(args: argparse.Namespace, out: Path, targets: tuple[str, ...]):
    from edge.training.recipes import TrainConfig
    from emulator.adapters.lora import LoraSettings
    from emulator.privacy.defence import DefenceSettings

    dlora = args.mode == "dlora"
    lr = args.lr if args.lr is not None else (DLORA_LR if dlora else TRAIN_DEFAULTS["lr"])
    warmup = args.warmup_steps
    if warmup is None:
        warmup = min(TRAIN_DEFAULTS["warmup_steps"], args.steps // 10) if dlora else TRAIN_DEFAULTS["warmup_steps"]
    return TrainConfig(
        cloud=args.cloud, identity=args.identity, data=args.data, out=out, eval=args.eval,
        mode=args.mode, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
        warmup_steps=warmup, schedule=args.schedule, clip=args.clip, edge_layers=args.edge_layers,
        lora=LoraSettings(args.lora_rank, args.lora_alpha, 0.0, targets),
        wire_dtype=args.wire_dtype or DEFAULT_WIRE[args.mode],
        eval_batch=args.eval_batch, seed=args.seed, threads=args.threads,
        kr=KillReviveConfig(args.kr_budget, args.kr_probe_every, args.kr_ema, args.kr_warmup, args.kr_score),
        eval_before=not args.no_eval_before,
        checkpoint_every=args.checkpoint_every, resume=args.resume is not None, retries=args.retries,
        tune=args.tune, emulator_layers=args.emulator_layers, emulator_dtype=args.emulator_dtype,
        federated=args.federated, defence=DefenceSettings(args.defence_noise, args.defence_nopeek))


def _check_eval_args(args: argparse.Namespace) -> None:
    check_address(args.cloud)
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: file not found")
    if args.seq_len < 2 or args.eval_batch < 1:
        raise UsageError("--seq-len must be at least 2 and --eval-batch at least 1")
    if args.mode == "dlora" and args.adapter is None:
        raise UsageError("--mode dlora evaluates a dlora adapter: pass --adapter DIR")
    if args.adapter is not None and not args.adapter.is_dir():
        raise UsageError(f"--adapter {args.adapter}: not a directory (pull one with `edgetune-edge pull`)")


def _eval_offsite(args: argparse.Namespace) -> None:
    from edge.modes.offsite import evaluate_offsite
    from emulator.adapters.lora import AdapterMismatchError
    from emulator.model.loading import compute_dtype

    try:
        result = evaluate_offsite(args.cloud, args.identity, args.data, args.adapter, args.edge_layers,
                                  args.emulator_layers, args.seq_len, args.eval_batch,
                                  emulator_dtype=compute_dtype(args.emulator_dtype))
    except (AdapterMismatchError, KeyError) as err:
        raise UsageError(_mismatch(args, err)) from None
    print(json.dumps({"eval_emulator_zero_shot": result.emulator_zero_shot,
                      "eval_emulator_adapter": result.emulator_adapter, "eval_plug_in": result.plug_in,
                      "eval_rows": result.rows, "eval_bytes_sent": result.traffic.bytes_sent,
                      "eval_bytes_received": result.traffic.bytes_received}))


def _mismatch(args: argparse.Namespace, err: Exception) -> str:
    detail = " ".join(str(err).split())[:200]
    return (f"--adapter {args.adapter}: does not fit --mode {args.mode} --edge-layers {args.edge_layers} on this "
            f"cloud's model; pass the --mode and --edge-layers it was trained with ({detail})")


def _runtime(args: argparse.Namespace) -> None:
    """export, predict and eval --runtime onnx (edge/runtime/; predict and eval import no torch)."""
    from edge.runtime.cli import run

    run(args, UsageError)


def _eval(args: argparse.Namespace) -> None:
    if args.runtime == "onnx":
        return _runtime(args)
    _check_eval_args(args)
    if args.mode == "offsite":
        return _eval_offsite(args)
    import torch

    from edge.rpc.client import CloudClient
    from edge.training.recipes import evaluate, open_edge_session
    from emulator.adapters.peft_names import target_leaves
    from emulator.data.datasets import load_eval, parse_eval
    from protocol.accounting import Traffic
    from protocol.channel import secure_channel

    parse_eval(args.data)
    config = _adapter_config(args.adapter) if args.adapter is not None else None
    leaves = target_leaves(config["target_modules"]) if config else ()
    with secure_channel(args.cloud, args.identity) as channel:
        es = open_edge_session(CloudClient(channel), args.edge_layers, "float32", args.mode, leaves)
        model, link = _with_adapter(es, args, config, leaves)
        data = load_eval(args.data, es.tokenizer, args.seq_len)
        traffic = Traffic()
        with torch.no_grad():
            accuracy = evaluate(model, link, data, es.pad_id, args.eval_batch, traffic)
        es.link.stream.close()
    print(json.dumps({"eval_accuracy": accuracy, "eval_rows": len(data.examples),
                      "eval_bytes_sent": traffic.bytes_sent, "eval_bytes_received": traffic.bytes_received}))


def _adapter_config(adapter: Path) -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter directory, checked before connecting."""
    path = adapter / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--adapter {adapter}: no adapter_config.json (a --tune full delta evaluates with "
                         "--mode offsite)") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--adapter {adapter}: adapter_config.json does not parse ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("target_modules"), list) or "r" not in config:
        raise UsageError(f"--adapter {adapter}: adapter_config.json is not a PEFT LoRA config")
    check_safetensors(adapter / "adapter_model.safetensors", f"--adapter {adapter}")
    return config


def check_safetensors(path: Path, flag: str) -> None:
    """Reads a safetensors header (8-byte length, then JSON) without torch: a damaged file is one line here."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except FileNotFoundError:
        raise UsageError(f"{flag}: {path.name} missing; pull the adapter again") from None
    except (OSError, ValueError):
        raise UsageError(f"{flag}: {path.name} is damaged (not safetensors); pull the adapter again") from None


def _with_adapter(es, args: argparse.Namespace, config: dict | None, leaves: tuple[str, ...]):
    """The edge model and link for evaluation, with the adapter's weights loaded where they belong."""
    from edge.modes.dlora import load_dlora_adapter
    from edge.training.recipes import dlora_link
    from emulator.adapters.lora import AdapterMismatchError, LoraSettings, add_lora, load_adapter_state, with_adapter

    if args.adapter is None or config is None:
        return es.model, es.link
    base = config.get("base_model_name_or_path")
    if base and base != es.model_name:
        raise UsageError(f"--adapter {args.adapter}: trained on {base!r}, but this cloud serves {es.model_name!r}")
    spec = es.model.bottom.spec
    try:
        if args.mode != "dlora":
            return with_adapter(es.model, args.adapter, spec), es.link
        state, _ = load_adapter_state(args.adapter)
        settings = LoraSettings(config["r"], config["lora_alpha"], 0.0, leaves)
        model = add_lora(es.model, settings, spec)
        link = dlora_link(es, settings, "float32")
        load_dlora_adapter(model, link.server.bank, state, spec)
    except (AdapterMismatchError, KeyError, ValueError) as err:
        raise UsageError(_mismatch(args, err)) from None
    return model, link


def _list(args: argparse.Namespace) -> None:
    check_address(args.cloud)
    from edge.rpc.client import CloudClient
    from protocol.channel import secure_channel

    with secure_channel(args.cloud, args.identity) as channel:
        for meta in CloudClient(channel).list_adapters():
            print(f"{meta.adapter_id}  {meta.created}  {meta.mode}  {meta.base_model}  {meta.size_bytes} B")


def new_directory(out: Path, flag: str = "--out") -> None:
    """Refuses an existing path: pulled adapters and written models are never replaced."""
    if out.exists():
        raise UsageError(f"{flag} {out}: already exists; give a new directory (nothing is overwritten)")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"{flag} {out}: a parent is not a directory; give a new directory")


def _pull(args: argparse.Namespace) -> None:
    check_address(args.cloud)
    new_directory(args.out)
    from edge.rpc.client import CloudClient
    from protocol.channel import secure_channel

    with secure_channel(args.cloud, args.identity) as channel:
        client = CloudClient(channel)

        def fetch(tmp: Path) -> Path:  # a private directory renamed into place at the end
            client.pull_adapter(args.adapter, tmp)
            return args.out

        publish_directory(args.out.parent, fetch)  # a failed pull leaves nothing behind
    print(f"adapter {args.adapter} written to {args.out} (PEFT format)")


def _base_model(args: argparse.Namespace) -> None:
    new_directory(args.out)
    from emulator.model.loading import resolve_model

    source = resolve_model(args.model)

    def copy(tmp: Path) -> Path:
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        return args.out

    publish_directory(args.out.parent, copy)
    print(f"base model {args.model} written to {args.out}: load adapters on it with "
          f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(args.out)!r}), ADAPTER_DIR)")


COMMANDS = {"train": _train, "eval": _eval, "list": _list, "pull": _pull, "base-model": _base_model,
            "export": _runtime, "predict": _runtime}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except UsageError as err:
        print(f"edgetune-edge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetune-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = _user_message(err, args)
        if message is None:
            raise
        print(f"edgetune-edge: error: {message}", file=sys.stderr)
        return 2
    return 0


def _user_message(err: Exception, args: argparse.Namespace) -> str | None:
    """One line for an error a user can cause, or None for a bug (which keeps its traceback)."""
    from edge.rpc.client import CloudCallError
    from edge.training.checkpoint import CheckpointError
    from edge.training.recipes import ConfigError
    from emulator.adapters.lora import AdapterMismatchError
    from emulator.data.datasets import DataError
    from emulator.model.loading import ModelNotFoundError
    from emulator.privacy.defence import DefenceError
    from protocol.channel import CredentialError

    if isinstance(err, CloudCallError):
        import grpc

        from protocol.diagnose import diagnose_connection

        hint = ""
        if err.code == grpc.StatusCode.UNAVAILABLE and hasattr(args, "identity"):
            hint = f"; diagnosis: {diagnose_connection(args.cloud, args.identity)}"
        return " ".join(f"{err}{hint}".split())
    user_errors = (ConfigError, DefenceError, DataError, CredentialError, FileNotFoundError, AdapterMismatchError,
                   CheckpointError, ModelNotFoundError, NotADirectoryError, PermissionError)
    return " ".join(str(err).split()) if isinstance(err, user_errors) else None


if __name__ == "__main__":
    sys.exit(main())
