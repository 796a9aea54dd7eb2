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

from cloud.backbone.ray_runner import STATUS_FILE, RayConnectError, RayPool, RaySettings, connect
from cloud.owner.federated import FederatedSettings
from cloud.rpc.auth import Authenticator
from cloud.rpc.handlers import Coordinator, Limits
from cloud.rpc.servicer import add_to_server
from emulator.adapters.lora import LoraSettings
from emulator.model.loading import COMPUTE_DTYPES, compute_dtype, load_causal_lm, resolve_model
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
    emulator_layers: int = 0  # offsite default E; 0: a third of the middle
    rounds: int = 0  # federated offsite rounds; 0: no federated job
    clients_per_round: int = 1
    local_steps: int = 50
    round_deadline_s: float = 600.0
    fed_lora: LoraSettings = LoraSettings(targets=("all",))
    backbone_dtype: str = "float32"  # dtype the frozen middle runs in (float32 or bfloat16)
    ray: RaySettings | None = None  # the middle on Ray workers (``serve --backbone ray``); None: in this process

    def federation(self) -> FederatedSettings | None:
        if not self.rounds:
            return None
        return FederatedSettings(self.rounds, self.clients_per_round, self.local_steps, self.round_deadline_s,
                                 self.fed_lora)

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
        if self.emulator_layers < 0 or self.rounds < 0:
            problems.append("--emulator-layers and --rounds must not be negative")
        if self.backbone_dtype not in COMPUTE_DTYPES:
            problems.append(f"--backbone-dtype {self.backbone_dtype!r}: choose from {', '.join(COMPUTE_DTYPES)}")
        if self.ray is not None:
            problems.extend(self.ray.problems())
        federation = self.federation()
        if federation is not None:
            problems.extend(federation.problems())
        if problems:
            raise ConfigError("; ".join(problems))


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> None:
    """Runs the coordinator until SIGTERM/SIGINT (or ``stop`` is set)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Bind first: a port held by another process is refused before seconds of model loading.
    server, port = create_server(cfg.pki, cfg.listen, max_workers=cfg.workers)
    model_dir = resolve_model(cfg.model)
    model = load_causal_lm(model_dir, dtype=torch.float32).requires_grad_(False)
    pool, started_ray = _ray_pool(cfg, model_dir) if cfg.ray is not None else (None, False)
    coordinator = Coordinator(cfg.model, model_dir, model, cfg.store, cfg.edge_layers, cfg.limits,
                              default_emulator_layers=cfg.emulator_layers, federation=cfg.federation(),
                              backbone_dtype=compute_dtype(cfg.backbone_dtype),
                              runner_factory=pool.runner if pool is not None else None)
    if coordinator.job is not None:
        print(f"federated job {coordinator.job.job_id}: {cfg.rounds} rounds, {cfg.clients_per_round} clients "
              f"per round, {cfg.local_steps} local steps, deadline {cfg.round_deadline_s:g} s", flush=True)
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
    if pool is not None:
        pool.close(shutdown=started_ray)
    print("edgetune-cloud stopped", flush=True)


def _ray_pool(cfg: ServeConfig, model_dir: Path) -> tuple[RayPool, bool]:
    """Joins (or starts) the Ray cluster and its middle workers; True when this process started Ray."""
    assert cfg.ray is not None
    try:
        started = connect(cfg.ray)
    except RayConnectError as err:
        raise ConfigError(str(err)) from None
    pool = RayPool(cfg.ray, model_dir, cfg.model, cfg.backbone_dtype, cfg.store / STATUS_FILE)
    live = [w for w in pool.status()["workers"] if w["live"]]
    print(f"frozen middle on Ray: {len(live)} worker(s) live "
          f"({'local instance' if started else cfg.ray.address}; batching {'on' if cfg.ray.batch else 'off'})",
          flush=True)
    return pool, started
