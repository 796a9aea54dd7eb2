"""The adapter registry: SQLite index plus one directory of encrypted PEFT files per adapter.

Every read takes the owner; an adapter that belongs to someone else is reported as not found,
so a client cannot even learn that another client's adapter exists. An adapter can be granted to
further identities (federated global adapters are granted to every participant of their job).
Files are sealed with the store's key (:mod:`cloud.store.vault`) and written atomically before the index
row is committed; a directory without a row (a crash in between) is removed at start-up once it is
older than :data:`ORPHAN_AGE_S`, so a second coordinator sharing the store never deletes an upload
that another one is still writing (its row follows its files within seconds).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from cloud.errors import InvalidArgument, NotFound
from cloud.store.vault import Vault
from emulator.adapters.plugin import DELTA_FORMAT, FORMAT_FILES
from protocol.types import AdapterMeta

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ALLOWED_FILES = frozenset(f for files in FORMAT_FILES.values() for f in files)  # PEFT LoRA or a block delta
ORPHAN_AGE_S = 3600.0  # a directory without a row this long after its last write was left by a crash

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    mode TEXT NOT NULL,
    base_model TEXT NOT NULL,
    session_id TEXT NOT NULL,
    created TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    metrics_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_owner ON adapters(owner);
CREATE TABLE IF NOT EXISTS grants (
    adapter_id TEXT NOT NULL,
    identity TEXT NOT NULL,
    PRIMARY KEY (adapter_id, identity)
);
"""
_VISIBLE = "(owner = ? OR adapter_id IN (SELECT adapter_id FROM grants WHERE identity = ?))"


class AdapterRegistry:
    """Adapters by owner, stored under ``store/adapters/<id>/`` and indexed in ``store/registry.sqlite``."""

    def __init__(self, store: Path, orphan_age_s: float = ORPHAN_AGE_S) -> None:
        self.root = store / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)
        self.vault = Vault(store)
        self._db = sqlite3.connect(store / "registry.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._remove_orphans(orphan_age_s)

    def add(self, owner: str, meta: AdapterMeta, staged: Path) -> AdapterMeta:
        """Validates the staged adapter files and registers them under a new id for ``owner``."""
        _validate_adapter_dir(staged)
        adapter_id = "ad-" + uuid.uuid4().hex[:12]
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        size = sum(p.stat().st_size for p in staged.iterdir())
        stored = replace(meta, adapter_id=adapter_id, owner=owner, created=created, size_bytes=size)
        target = self.root / adapter_id
        for path in sorted(staged.iterdir()):
            self.vault.seal(target / f"{path.name}.enc", path.read_bytes(), f"{adapter_id}/{path.name}")
        with self._lock:
            self._db.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (adapter_id, owner, stored.mode, stored.base_model, stored.session_id, created, size,
                 stored.metrics_json),
            )
        return stored

    def list_all(self) -> list[AdapterMeta]:
        """Every adapter in the store, whoever owns it: for the model owner's own tools, never for an RPC."""
        with self._lock:
            rows = self._db.execute(
                "SELECT adapter_id, owner, mode, base_model, session_id, created, size_bytes, metrics_json "
                "FROM adapters ORDER BY created, adapter_id").fetchall()
        return [_meta(row) for row in rows]

    def list(self, owner: str) -> list[AdapterMeta]:
        with self._lock:
            rows = self._db.execute(
                "SELECT adapter_id, owner, mode, base_model, session_id, created, size_bytes, metrics_json "
                f"FROM adapters WHERE {_VISIBLE} ORDER BY created, adapter_id", (owner, owner)).fetchall()
        return [_meta(row) for row in rows]

    def get(self, owner: str, adapter_id: str) -> tuple[AdapterMeta, dict[str, bytes]]:
        """The adapter's metadata and decrypted files, if ``owner`` owns it.

        Raises:
            NotFound: no such adapter for this owner.
            CorruptArtifactError: a stored file failed authentication.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT adapter_id, owner, mode, base_model, session_id, created, size_bytes, metrics_json "
                f"FROM adapters WHERE adapter_id = ? AND {_VISIBLE}", (adapter_id, owner, owner)).fetchone()
        if row is None:
            raise NotFound(f"no adapter {adapter_id!r} belongs to identity {owner!r}; "
                           "`edgetune-edge list` shows yours")
        directory = self.root / adapter_id
        files = {name: self.vault.open(directory / f"{name}.enc", f"{adapter_id}/{name}")
                 for name in adapter_files(directory)}
        return _meta(row), files

    def owner_of(self, adapter_id: str) -> str:
        """The identity that registered ``adapter_id``: for the model owner's own tools on its store
        (``evaluate``, ``export``), never for an RPC, where the caller's TLS identity decides.

        Raises:
            NotFound: no such adapter in this store.
        """
        with self._lock:
            row = self._db.execute("SELECT owner FROM adapters WHERE adapter_id = ?", (adapter_id,)).fetchone()
        if row is None:
            raise NotFound(f"no adapter {adapter_id!r} in this store")
        return str(row[0])

    def _remove_orphans(self, max_age_s: float) -> None:
        """Removes adapter directories without a row whose newest write is older than ``max_age_s``."""
        now = time.time()
        known = {row[0] for row in self._db.execute("SELECT adapter_id FROM adapters")}
        for directory in self.root.iterdir():
            if directory.name not in known and now - _last_write(directory) > max_age_s:
                shutil.rmtree(directory, ignore_errors=True)

    def grant(self, adapter_id: str, identity: str) -> None:
        """Lets ``identity`` list and pull ``adapter_id`` too (idempotent)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO grants VALUES (?, ?)", (adapter_id, identity))

    def close(self) -> None:
        self._db.close()


def staging_dir(store: Path) -> Path:
    """A fresh private directory for an upload in progress."""
    root = store / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root))


def adapter_files(directory: Path) -> list[str]:
    """The (plaintext) file names of a stored adapter, config first."""
    names = {p.name.removesuffix(".enc") for p in directory.iterdir()}
    return next([*files] for files in FORMAT_FILES.values() if set(files) == names)


def _validate_adapter_dir(directory: Path) -> None:
    names = sorted(p.name for p in directory.iterdir())
    formats = {fmt: files for fmt, files in FORMAT_FILES.items() if sorted(files) == names}
    if not formats:
        raise InvalidArgument(f"an adapter upload holds exactly {list(ADAPTER_FILES)} (LoRA) or "
                              f"{list(FORMAT_FILES['delta'])} (--tune full), got {names}")
    fmt, (config_name, weights_name) = next(iter(formats.items()))
    try:
        config = json.loads((directory / config_name).read_text())
        with safe_open(str(directory / weights_name), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # noqa: BLE001 - any parse failure means a bad upload
        raise InvalidArgument(f"adapter files do not parse: {err}") from None
    if fmt == "delta":
        if config.get("format") != DELTA_FORMAT or not keys:
            raise InvalidArgument(f"{config_name} must describe an {DELTA_FORMAT} with weights")
        return
    if config.get("peft_type") != "LORA" or not keys:
        raise InvalidArgument("adapter_config.json must describe a LORA adapter with weights")
    if any("lora_" not in k for k in keys):
        raise InvalidArgument("adapter weights may only contain LoRA tensors")


def _last_write(directory: Path) -> float:
    """The newest modification time of ``directory`` and its files (0 when it vanished meanwhile)."""
    try:
        return max([directory.stat().st_mtime, *(p.stat().st_mtime for p in directory.iterdir())])
    except FileNotFoundError:
        return 0.0


def _meta(row: tuple) -> AdapterMeta:
    adapter_id, owner, mode, base_model, session_id, created, size, metrics = row
    return AdapterMeta(adapter_id=adapter_id, owner=owner, mode=mode, base_model=base_model,
                       session_id=session_id, created=created, size_bytes=size, metrics_json=metrics)
