"""The ``serve`` recipe: validate configuration, load the backbone, serve until told to stop."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from cloud.auth import Authenticator
from cloud.handlers import Coordinator, Limits
from cloud.servicer import add_to_server
from emulator.models import load_causal_lm, resolve_model
from protocol.channel import create_server
from protocol.pki import RevocationList

log = logging.getLogger("edgetune.cloud")
SERVICE_NAME = "edgetune.v1.Coordinator"
GRACE_S = 10


class ConfigError(ValueError):
    """Invalid ``serve`` settings; lists every problem at once."""


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``edgetune-cloud serve``, validated at construction."""

    model: str
    pki: Path
    listen: str
    store: Path
    edge_layers: int = 2
    workers: int = 16
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    port_file: Path | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        problems = []
        if not (self.pki / "server.crt").is_file():
            problems.append(f"--pki {self.pki}: no server.crt (run `edgetune-cloud pki init {self.pki}`)")
        if ":" not in self.listen:
            problems.append(f"--listen {self.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
        if self.edge_layers < 1:
            problems.append(f"--edge-layers {self.edge_layers}: must be at least 1")
        if self.limits.max_streams_per_client < 1 or self.limits.idle_timeout_s <= 0:
            problems.append("--max-streams-per-client and --idle-timeout must be positive")
        if self.workers < 1:
            problems.append(f"--workers {self.workers}: must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems))


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> None:
    """Runs the coordinator until SIGTERM/SIGINT (or ``stop`` is set)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model(cfg.model)
    model = load_causal_lm(model_dir, dtype=torch.float32).requires_grad_(False)
    coordinator = Coordinator(cfg.model, model_dir, model, cfg.store, cfg.edge_layers, cfg.limits)
    server, port = create_server(cfg.pki, cfg.listen, max_workers=cfg.workers)
    add_to_server(coordinator, Authenticator(RevocationList(cfg.pki)), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.start()
    for service in ("", SERVICE_NAME):
        health.set(service, health_pb2.HealthCheckResponse.SERVING)
    host = cfg.listen.rsplit(":", 1)[0]
    print(f"edgetune-cloud serving {cfg.model} on {host}:{port} (mutual TLS, store {cfg.store})", flush=True)
    if cfg.port_file is not None:
        tmp = cfg.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(cfg.port_file)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: refusing new calls, finishing in-flight steps (up to %d s)", GRACE_S)
    health.enter_graceful_shutdown()
    server.stop(grace=GRACE_S).wait()
    coordinator.registry.close()
    print("edgetune-cloud stopped", flush=True)
