"""``edgetune-edge``: train, evaluate, list and pull adapters from an edge device."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core logs handshake details; we explain them instead
import json
import sys
from pathlib import Path

import grpc
import torch

from edge.client import CloudCallError, CloudClient
from edge.data import DataError, load_eval, parse_eval
from edge.offsite import evaluate_offsite, train_offsite
from edge.train import MODES, TUNES, ConfigError, TrainConfig, evaluate, open_edge_session, train
from emulator.lora import AdapterMismatchError, LoraSettings, with_adapter
from protocol.accounting import Traffic
from protocol.channel import CredentialError, secure_channel
from protocol.diagnose import diagnose_connection
from protocol.tensors import WIRE_DTYPES

USER_ERRORS = (ConfigError, DataError, CredentialError, FileNotFoundError, AdapterMismatchError)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cloud", required=True, help="coordinator HOST:PORT")
    p.add_argument("--identity", type=Path, required=True, help="DIR/clients/NAME from `pki issue`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune-edge", description="edgetune edge client")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune LoRA on local data with the cloud's backbone")
    _connection(t)
    d = TrainConfig.__dataclass_fields__
    t.add_argument("--data", type=Path, required=True, help="training JSONL (prompt/completion or text)")
    t.add_argument("--eval", type=Path, help="evaluation JSONL (prompt/choices/answer)")
    t.add_argument("--out", type=Path, required=True, help="run directory (adapter/, metrics.json)")
    t.add_argument("--mode", default="split", choices=list(MODES),
                   help="split: the cloud runs the middle every step; offsite: train offline against an emulator")
    t.add_argument("--tune", default="lora", choices=list(TUNES),
                   help="offsite: LoRA on the adapter blocks, or full tuning of the adapter blocks")
    t.add_argument("--emulator-layers", type=int, default=0, help="offsite: emulator depth E (0: the cloud's)")
    t.add_argument("--federated", action="store_true", help="offsite: join the cloud's FedAvg rounds")
    t.add_argument("--steps", type=int, default=d["steps"].default)
    t.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    t.add_argument("--seq-len", type=int, default=d["seq_len"].default)
    t.add_argument("--lr", type=float, default=d["lr"].default)
    t.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default)
    t.add_argument("--schedule", default=d["schedule"].default, help="transformers scheduler name")
    t.add_argument("--clip", type=float, default=d["clip"].default, help="gradient-norm clip (0: off)")
    t.add_argument("--edge-layers", type=int, default=0, help="K blocks at each end (0: the cloud's default)")
    t.add_argument("--lora-rank", type=int, default=LoraSettings.rank)
    t.add_argument("--lora-alpha", type=int, default=LoraSettings.alpha)
    t.add_argument("--lora-targets", default="all",
                   help="comma-separated projection names, 'all' (every linear layer of a block), "
                        "or '' for the architecture's default (q/v for LLaMA)")
    t.add_argument("--wire-dtype", default="float32", choices=list(WIRE_DTYPES))
    t.add_argument("--eval-batch", type=int, default=d["eval_batch"].default)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    e = sub.add_parser("eval", help="accuracy on an evaluation JSONL by split inference")
    _connection(e)
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--adapter", type=Path, help="PEFT adapter directory (default: the base model)")
    e.add_argument("--mode", default="split", choices=list(MODES),
                   help="offsite: emulator zero-shot, emulator + adapter, and plug-in by split inference")
    e.add_argument("--edge-layers", type=int, default=0)
    e.add_argument("--emulator-layers", type=int, default=0)
    e.add_argument("--seq-len", type=int, default=d["seq_len"].default)
    e.add_argument("--eval-batch", type=int, default=d["eval_batch"].default)
    ls = sub.add_parser("list", help="list the adapters this identity owns")
    _connection(ls)
    pl = sub.add_parser("pull", help="download an adapter this identity owns (PEFT format)")
    _connection(pl)
    pl.add_argument("--adapter", required=True, help="adapter id")
    pl.add_argument("--out", type=Path, required=True)
    return parser


def _train(args: argparse.Namespace) -> None:
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    cfg = TrainConfig(
        cloud=args.cloud, identity=args.identity, data=args.data, out=args.out, eval=args.eval,
        mode=args.mode, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, schedule=args.schedule, clip=args.clip, edge_layers=args.edge_layers,
        lora=LoraSettings(args.lora_rank, args.lora_alpha, 0.0, targets), wire_dtype=args.wire_dtype,
        eval_batch=args.eval_batch, seed=args.seed, threads=args.threads, tune=args.tune,
        emulator_layers=args.emulator_layers, federated=args.federated)
    metrics = train_offsite(cfg) if cfg.mode == "offsite" else train(cfg)
    print(f"adapter {metrics.adapter_id} registered; files in {args.out / 'adapter'}, "
          f"metrics in {args.out / 'metrics.json'}")


def _eval_offsite(args: argparse.Namespace) -> None:
    result = evaluate_offsite(args.cloud, args.identity, args.data, args.adapter, args.edge_layers,
                              args.emulator_layers, args.seq_len, args.eval_batch)
    print(json.dumps({"eval_emulator_zero_shot": result.emulator_zero_shot,
                      "eval_emulator_adapter": result.emulator_adapter, "eval_plug_in": result.plug_in,
                      "eval_rows": result.rows, "eval_bytes_sent": result.traffic.bytes_sent,
                      "eval_bytes_received": result.traffic.bytes_received}))


def _eval(args: argparse.Namespace) -> None:
    if args.mode == "offsite":
        return _eval_offsite(args)
    parse_eval(args.data)
    with secure_channel(args.cloud, args.identity) as channel:
        es = open_edge_session(CloudClient(channel), args.edge_layers, "float32")
        model = es.model
        if args.adapter is not None:
            model = with_adapter(model, args.adapter, model.bottom.spec)
        data = load_eval(args.data, es.tokenizer, args.seq_len)
        traffic = Traffic()
        with torch.no_grad():
            accuracy = evaluate(model, es.link, data, es.pad_id, args.eval_batch, traffic)
        es.link.stream.close()
    print(json.dumps({"eval_accuracy": accuracy, "eval_rows": len(data.examples),
                      "eval_bytes_sent": traffic.bytes_sent, "eval_bytes_received": traffic.bytes_received}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "list":
            with secure_channel(args.cloud, args.identity) as channel:
                for meta in CloudClient(channel).list_adapters():
                    print(f"{meta.adapter_id}  {meta.created}  {meta.mode}  {meta.base_model}  {meta.size_bytes} B")
        else:
            with secure_channel(args.cloud, args.identity) as channel:
                CloudClient(channel).pull_adapter(args.adapter, args.out)
            print(f"adapter {args.adapter} written to {args.out} (PEFT format)")
    except CloudCallError as err:
        hint = ""
        if err.code == grpc.StatusCode.UNAVAILABLE and hasattr(args, "identity"):
            hint = f"; diagnosis: {diagnose_connection(args.cloud, args.identity)}"
        print(f"edgetune-edge: error: {err}{hint}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"edgetune-edge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetune-edge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
