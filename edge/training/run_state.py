"""The training-progress state a checkpoint carries besides weights: Kill-and-Revive and module tallies."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edge.modes.kill_revive import Event, KillRevive
from edge.training.module_report import ModuleTally


def progress_state(kr: KillRevive, tally: ModuleTally) -> dict[str, Any]:
    """JSON-ready Kill-and-Revive scores, active set and events, and the per-module tallies."""
    return {"kr": {"scores": kr.scores, "active": sorted(kr.active), "events": [asdict(e) for e in kr.events]},
            "tally": {"steps_active": tally.steps_active, "flops": tally.flops}}


def restore_progress(kr: KillRevive, tally: ModuleTally, state: dict[str, Any]) -> None:
    """Puts :func:`progress_state`'s output back into fresh controller and tally objects."""
    saved = state.get("kr", {})
    kr.scores = dict(saved.get("scores", {}))
    kr.active = frozenset(saved.get("active", kr.active))
    kr.events = [Event(**e) for e in saved.get("events", [])]
    tally.steps_active = dict(state.get("tally", {}).get("steps_active", {}))
    tally.flops = dict(state.get("tally", {}).get("flops", {}))
