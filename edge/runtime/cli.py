"""The ``export`` and ``predict`` commands and ``eval --runtime onnx``, wired into ``edgetune-edge``.

``edge/cli.py`` calls :func:`add_commands` and :func:`add_eval_runtime` while building its parser and
:func:`run` to execute; this module imports neither torch nor onnxruntime at the top, and ``predict``
and ``eval --runtime onnx`` never import torch at all. Also runnable as ``python -m edge.runtime.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNTIMES = ("torch", "onnx")


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cloud", required=True, help="coordinator HOST:PORT")
    p.add_argument("--identity", type=Path, required=True, help="DIR/clients/NAME from `pki issue`")


def _inference_flags(p: argparse.ArgumentParser, batch_flag: str) -> None:
    p.add_argument("--model", type=Path, help="export directory from `edgetune-edge export` (--runtime onnx)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: onnxruntime's default)")
    if batch_flag != "--eval-batch":  # eval already has --seq-len and --eval-batch
        p.add_argument("--seq-len", type=int, default=64, help="prompts are cut from the left to fit")
        p.add_argument(batch_flag, type=int, default=32, help="rows per forward pass")


def add_commands(sub, formatter: type[argparse.HelpFormatter] = argparse.HelpFormatter) -> None:
    """Adds ``export`` and ``predict`` to an ``argparse`` sub-parser collection."""
    x = sub.add_parser("export", formatter_class=formatter,
                       help="write the edge segments with a trained adapter merged as ONNX, for onnxruntime")
    x.add_argument("--adapter", type=Path, required=True, help="adapter directory (RUN/adapter or a pulled one)")
    x.add_argument("--out", type=Path, required=True, help="new export directory (never overwritten)")
    x.add_argument("--quantize", choices=["int8"], help="int8: dynamic int8 quantization of the weights")
    x.add_argument("--bundle", type=Path,
                   help="edge bundle of the base model (default: the cached one the adapter fits)")
    x.add_argument("--edge-layers", type=int, default=0,
                   help="K the adapter was trained with, when several cached bundles fit (0: infer)")
    p = sub.add_parser("predict", formatter_class=formatter,
                       help="predict a label or completion per input row; the middle runs on the cloud")
    _connection(p)
    p.add_argument("--runtime", choices=["onnx"], default="onnx", help="the edge segments' runtime")
    p.add_argument("--data", type=Path, required=True,
                   help="JSONL: {prompt, choices[, answer]} for a label, {prompt} for a greedy completion")
    p.add_argument("--out", type=Path, required=True, help="JSONL predictions, one row per input (new file)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy completion length (rows without choices)")
    _inference_flags(p, "--batch")


def add_eval_runtime(e: argparse.ArgumentParser) -> None:
    """Adds ``--runtime``, ``--model`` and ``--threads`` to the ``eval`` parser."""
    e.add_argument("--runtime", choices=RUNTIMES, default="torch",
                   help="torch: the bundle's segments and --adapter; onnx: an export (--model), no torch needed")
    _inference_flags(e, "--eval-batch")


def _check(args: argparse.Namespace) -> None:
    from edge.runtime.manifest import ExportError

    if args.command == "export":
        return
    if args.model is None:
        raise ExportError("--runtime onnx runs an export: pass --model DIR (from `edgetune-edge export`)")
    if getattr(args, "adapter", None) is not None and args.command == "eval":
        raise ExportError("--runtime onnx takes the adapter merged in the export: pass --model DIR, not --adapter")
    if ":" not in args.cloud or not args.cloud.rsplit(":", 1)[1].isdigit():
        raise ExportError(f"--cloud {args.cloud!r}: expected HOST:PORT, e.g. cloud.example.org:50051")
    if not args.data.is_file():
        raise ExportError(f"--data {args.data}: file not found")
    batch = args.batch if args.command == "predict" else args.eval_batch
    if args.seq_len < 2 or batch < 1 or args.threads < 0:
        raise ExportError("--seq-len must be at least 2, the batch at least 1 and --threads at least 0")
    if args.command == "predict" and args.out.exists():
        raise ExportError(f"--out {args.out}: exists; choose a new file (predictions are never overwritten)")


def _export(args: argparse.Namespace) -> None:
    from edge.runtime.export import export

    result = export(args.adapter, args.out, args.quantize, args.bundle, args.edge_layers)
    m = result.manifest
    print(f"exported {m['base_model']['name']} (K={m['base_model']['edge_layers']}, {m['precision']}, opset "
          f"{m['opset']}) with adapter {m['adapter']['id'] or m['adapter']['path']} merged to {result.out}")
    if result.note:
        print(result.note)


def _predict(args: argparse.Namespace) -> None:
    from edge.runtime.predict import predict, write_records

    batch = args.batch if args.command == "predict" else args.eval_batch
    max_new = args.max_new_tokens if args.command == "predict" else 0
    result = predict(args.model, args.cloud, args.identity, args.data, args.seq_len, batch, max_new, args.threads)
    if result.note:
        print(result.note, file=sys.stderr)
    if args.command == "predict":
        write_records(result.records, args.out)
        accuracy = "" if result.accuracy is None else f"; accuracy {result.accuracy:.4f}"
        print(f"{len(result.records)} predictions written to {args.out}{accuracy}")
        return
    print(json.dumps({"eval_accuracy": result.accuracy, "eval_rows": len(result.records), "eval_runtime": "onnx",
                      "eval_bytes_sent": result.traffic.bytes_sent,
                      "eval_bytes_received": result.traffic.bytes_received}))


def run(args: argparse.Namespace, usage_error: type[Exception] = ValueError) -> None:
    """Runs ``export``, ``predict`` or ``eval --runtime onnx``; user mistakes become ``usage_error(one line)``."""
    from edge.runtime.inputs import InputError
    from edge.runtime.manifest import ExportError
    from edge.runtime.remote import RemoteError
    from protocol.channel import CredentialError
    from protocol.serde import WireFormatError

    try:
        _check(args)
        _export(args) if args.command == "export" else _predict(args)
    except RemoteError as err:
        raise usage_error(_with_diagnosis(err, args)) from None
    except (ExportError, InputError, CredentialError, WireFormatError) as err:
        raise usage_error(" ".join(str(err).split())) from None


def _with_diagnosis(err: Exception, args: argparse.Namespace) -> str:
    import grpc

    from protocol.diagnose import diagnose_connection

    hint = ""
    if getattr(err, "code", None) == grpc.StatusCode.UNAVAILABLE:
        hint = f"; diagnosis: {diagnose_connection(args.cloud, args.identity)}"
    return " ".join(f"{err}{hint}".split())


class _Usage(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    """``python -m edge.runtime.cli export|predict ...`` (the same commands as ``edgetune-edge``)."""
    parser = argparse.ArgumentParser(prog="edgetune-edge", description="edgetune edge inference runtime")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        run(args, _Usage)
    except _Usage as err:
        print(f"edgetune-edge: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
