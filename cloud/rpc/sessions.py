"""Training sessions: who owns them and what a session is waiting for."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cloud.backbone.dlora import DloraBackbone
from cloud.backbone.local import BackboneRunner, PendingBackward
from cloud.errors import NotFound
from emulator.model.segments import SplitPlan


@dataclass
class Session:
    """One client's session: its split, its backbone, and the forward awaiting a backward."""

    session_id: str
    owner: str
    mode: str
    plan: SplitPlan
    runner: BackboneRunner | DloraBackbone | None  # None for offsite sessions: the edge trains without the middle
    created: float = field(default_factory=time.time)
    pending_step: int | None = None
    pending: PendingBackward | None = None
    steps: int = 0
    compute_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    remote_sites: tuple[str, ...] = ()  # dlora: full-model names of the cloud-held LoRA sites


class SessionManager:
    """Sessions by id; lookups check the owner so one client never reaches another's session."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, owner: str, mode: str, plan: SplitPlan, runner: BackboneRunner | DloraBackbone | None,
             remote_sites: tuple[str, ...] = (), session_id: str | None = None) -> Session:
        session_id = session_id or "se-" + uuid.uuid4().hex[:16]
        session = Session(session_id, owner, mode, plan, runner, remote_sites=remote_sites)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.get(session_id)

    def get(self, owner: str, session_id: str) -> Session:
        session = self.find(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"no session {session_id!r} belongs to identity {owner!r}; open a new one")
        return session

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if owner is None or s.owner == owner)


class SessionLog:
    """Durable record of opened sessions (``store/sessions.sqlite``): who opened what, so that a
    restarted coordinator rebuilds a session when its edge reconnects."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sessions (session_id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                         "request TEXT NOT NULL, created REAL NOT NULL)")
        self._lock = threading.Lock()

    def record(self, session_id: str, owner: str, request: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                             (session_id, owner, json.dumps(request), time.time()))

    def lookup(self, session_id: str) -> tuple[str, dict] | None:
        with self._lock:
            row = self._db.execute("SELECT owner, request FROM sessions WHERE session_id = ?",
                                   (session_id,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def close(self) -> None:
        self._db.close()
