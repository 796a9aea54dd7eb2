"""Training sessions: who owns them and what a session is waiting for."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cloud.backbone.dlora import SessionSites
from cloud.backbone.seam import BackboneRunner
from cloud.errors import NotFound
from emulator.model.segments import SplitPlan


@dataclass
class Session:
    """One client's session: its split, its backbone, and the step whose graph the runner keeps.

    ``compute_s`` and ``steps`` are the session's stats: the runner's compute seconds over every
    forward and backward, and the completed training steps.
    """

    session_id: str
    owner: str
    mode: str
    plan: SplitPlan
    runner: BackboneRunner | None  # None for offsite sessions: the edge trains without the middle
    created: float = field(default_factory=time.time)
    pending_step: int | None = None  # the training forward whose backward the runner waits for
    steps: int = 0
    compute_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    remote_sites: tuple[str, ...] = ()  # dlora: full-model names of the cloud-held LoRA sites
    sites: SessionSites | None = None  # dlora: the sites the runner routes to the edge
    last_used: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def record_compute(self, seconds: float, step_done: bool = False) -> None:
        self.compute_s += seconds
        self.steps += int(step_done)


class SessionManager:
    """Sessions by id; lookups check the owner so one client never reaches another's session.

    A session unused for ``idle_timeout_s`` is evicted and its kept graph released: an edge that
    died mid-step does not pin the middle's activations. Its log row stays, so an edge that comes
    back reopens it (the step in flight is lost and retried).
    """

    def __init__(self, idle_timeout_s: float = 300.0) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.idle_timeout_s = idle_timeout_s
        self._stop = threading.Event()

    def open(self, owner: str, mode: str, plan: SplitPlan, runner: BackboneRunner | None,
             remote_sites: tuple[str, ...] = (), session_id: str | None = None,
             sites: SessionSites | None = None) -> Session:
        self.evict_idle()
        session_id = session_id or "se-" + uuid.uuid4().hex[:16]
        session = Session(session_id, owner, mode, plan, runner, remote_sites=remote_sites, sites=sites)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.touch()
        return session

    def get(self, owner: str, session_id: str) -> Session:
        session = self.find(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"no session {session_id!r} belongs to identity {owner!r}; open a new one")
        return session

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if owner is None or s.owner == owner)

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Drops the sessions idle for longer than the timeout and frees their graphs; returns their ids.

        A session whose step is running (its lock held) is never idle.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values() if now - s.last_used > self.idle_timeout_s]
            evicted = []
            for session in idle:
                if session.lock.acquire(blocking=False):
                    del self._sessions[session.session_id]
                    evicted.append(session)
        for session in evicted:
            try:
                if session.runner is not None:
                    session.runner.release(session.session_id)
                session.pending_step = None
            finally:
                session.lock.release()
        return [s.session_id for s in evicted]

    def start_reaper(self, interval_s: float) -> None:
        """Evicts idle sessions every ``interval_s`` in a daemon thread until :meth:`stop_reaper`."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.evict_idle()

        threading.Thread(target=loop, name="edgetune-session-reaper", daemon=True).start()

    def stop_reaper(self) -> None:
        self._stop.set()


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
