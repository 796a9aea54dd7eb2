"""``edgetune-cloud``: PKI management and the coordinator service."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core logs handshake details; we explain them instead
import logging
import sys
from pathlib import Path

from cloud.handlers import Limits
from cloud.server import ConfigError, ServeConfig, serve
from emulator.arch import UnsupportedArchitectureError
from emulator.models import ModelNotFoundError
from emulator.segments import SplitError
from protocol.channel import CredentialError
from protocol.pki import PkiError, init_pki, issue_client, revoke_client

USER_ERRORS = (ConfigError, CredentialError, PkiError, ModelNotFoundError, SplitError,
               UnsupportedArchitectureError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetune-cloud", description="edgetune cloud coordinator")
    sub = parser.add_subparsers(dest="command", required=True)
    pki = sub.add_parser("pki", help="manage the certificate authority and identities").add_subparsers(
        dest="pki_command", required=True)
    init = pki.add_parser("init", help="create a CA and the server certificate")
    init.add_argument("dir", type=Path)
    init.add_argument("--hosts", default="localhost,127.0.0.1",
                      help="comma-separated DNS names / IPs the server certificate is valid for")
    init.add_argument("--days", type=int, default=365)
    issue = pki.add_parser("issue", help="issue a client identity DIR/clients/NAME")
    issue.add_argument("dir", type=Path)
    issue.add_argument("name")
    issue.add_argument("--days", type=int, default=365)
    revoke = pki.add_parser("revoke", help="revoke identity NAME (refused at its next call)")
    revoke.add_argument("dir", type=Path)
    revoke.add_argument("name")
    srv = sub.add_parser("serve", help="run the coordinator")
    srv.add_argument("--model", default="smollm2-135m", help="built-in name or local HF directory")
    srv.add_argument("--pki", type=Path, required=True, help="directory written by `pki init`")
    srv.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks a free one)")
    srv.add_argument("--store", type=Path, required=True, help="directory for bundles and adapters")
    srv.add_argument("--edge-layers", type=int, default=2, help="default K: blocks at each end kept on the edge")
    srv.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    srv.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    srv.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    srv.add_argument("--max-streams-per-client", type=int, default=Limits.max_streams_per_client)
    srv.add_argument("--max-tensor-mb", type=float, default=Limits.max_tensor_bytes / 2**20,
                     help="largest tensor a client may send, in MiB")
    srv.add_argument("--idle-timeout", type=float, default=Limits.idle_timeout_s,
                     help="seconds of client silence before a training stream is closed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "pki" and args.pki_command == "init":
            hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
            init_pki(args.dir, hosts, args.days)
            print(f"CA and server certificate for {', '.join(hosts)} written to {args.dir}")
        elif args.command == "pki" and args.pki_command == "revoke":
            serial = revoke_client(args.dir, args.name)
            print(f"identity {args.name!r} (serial {serial:x}) revoked; running coordinators refuse it "
                  "from its next call")
        elif args.command == "pki":
            out = issue_client(args.dir, args.name, args.days)
            print(f"identity {args.name!r} written to {out}; hand this directory to its edge owner")
        else:
            limits = Limits(args.max_streams_per_client, int(args.max_tensor_mb * 2**20), args.idle_timeout)
            serve(ServeConfig(args.model, args.pki, args.listen, args.store, args.edge_layers,
                              args.workers, args.threads, args.port_file, limits))
    except USER_ERRORS as err:
        print(f"edgetune-cloud: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
