"""Training sessions: who owns them and what a session is waiting for."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from cloud.backbone import BackboneRunner, PendingBackward
from cloud.errors import NotFound
from emulator.segments import SplitPlan


@dataclass
class Session:
    """One client's session: its split, its backbone, and the forward awaiting a backward."""

    session_id: str
    owner: str
    mode: str
    plan: SplitPlan
    runner: BackboneRunner | None  # None for offsite sessions: the edge trains without the middle
    created: float = field(default_factory=time.time)
    pending_step: int | None = None
    pending: PendingBackward | None = None
    steps: int = 0
    compute_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionManager:
    """Sessions by id; lookups check the owner so one client never reaches another's session."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, owner: str, mode: str, plan: SplitPlan, runner: BackboneRunner | None) -> Session:
        session = Session("se-" + uuid.uuid4().hex[:16], owner, mode, plan, runner)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def get(self, owner: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"no session {session_id!r} belongs to identity {owner!r}; open a new one")
        return session

    def count(self, owner: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if owner is None or s.owner == owner)
