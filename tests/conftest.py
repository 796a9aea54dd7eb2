"""Shared fixtures: tiny models of each family, a PKI, and a real coordinator process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from emulator.model.loading import cache_root
from protocol.pki import init_pki, issue_client
from tests.tiny_models import save_tiny

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["llama", "gpt2", "opt"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Bundles downloaded by tests go to a private cache; the converted real model is shared."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    if not cache.exists():
        cache.mkdir()
        shared = cache_root() / "models"
        shared.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(shared, target_is_directory=True)
    monkeypatch.setenv("EDGETUNE_CACHE", str(cache))
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: save_tiny(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, ["localhost", "127.0.0.1"])
    for name in ("alice", "bob"):
        issue_client(directory, name)
    return directory


@dataclass
class Cloud:
    address: str
    process: subprocess.Popen
    store: Path
    log: Path


def start_cloud(model: str, pki_dir: Path, store: Path, extra: list[str] | None = None,
                env: dict[str, str] | None = None, timeout: float = 180, listen: str = "127.0.0.1:0") -> Cloud:
    """Starts ``edgetune-cloud serve`` as a separate process on an ephemeral loopback port."""
    store.mkdir(parents=True, exist_ok=True)
    port_file, log = store / "port", store / "cloud.log"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--model", model, "--pki", str(pki_dir),
           "--listen", listen, "--store", str(store), "--port-file", str(port_file),
           "--threads", "1", *(extra or [])]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"cloud did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return Cloud(f"127.0.0.1:{port_file.read_text()}", proc, store, log)


def stop_cloud(cloud: Cloud) -> None:
    cloud.process.terminate()
    try:
        cloud.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        cloud.process.kill()


@pytest.fixture(scope="module")
def tiny_cloud(tiny_dirs, pki, tmp_path_factory) -> Iterator[Cloud]:
    cloud = start_cloud(str(tiny_dirs["llama"]), pki, tmp_path_factory.mktemp("store"))
    yield cloud
    stop_cloud(cloud)
