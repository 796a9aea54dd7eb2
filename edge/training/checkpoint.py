"""Edge checkpoints: trainable weights, optimizer, scheduler, data position and records, atomically.

A checkpoint is ``RUN/checkpoint/`` with ``trainable.safetensors`` (the trainable tensors by
name), ``optimizer.pt`` (optimizer and scheduler state dicts and torch's RNG state, loaded with
``weights_only=True``) and ``state.json`` (step, session id, extra state such as Kill-and-Revive,
and the per-step records so far). Every file is written to a temporary name, fsynced and renamed,
and ``state.json`` goes last, so a crash mid-checkpoint leaves the previous checkpoint usable.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from protocol.fileio import atomic_write

CHECKPOINT = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run it is resumed into."""


@dataclass
class Checkpoint:
    """What a resumed run needs besides the weights and optimizer."""

    step: int
    session_id: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(run: Path, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: Checkpoint) -> None:
    """Writes a checkpoint of ``params`` (trainable tensors by name) and the optimizer after ``state.step``."""
    directory = run / CHECKPOINT
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "trainable.safetensors", save({n: p.detach().contiguous() for n, p in params.items()}))
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    atomic_write(directory / "optimizer.pt", buffer.getvalue())
    atomic_write(directory / "state.json", json.dumps(state.__dict__, indent=1).encode())


def peek_checkpoint(run: Path) -> Checkpoint | None:
    """The saved state of ``run``'s checkpoint without loading weights (``None`` when there is none)."""
    path = run / CHECKPOINT / "state.json"
    return Checkpoint(**json.loads(path.read_text())) if path.is_file() else None


def load_checkpoint(run: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: Any, settings: dict[str, Any]) -> Checkpoint:
    """Restores ``params``, optimizer, scheduler and RNG from ``run``; returns the saved state.

    Raises:
        CheckpointError: no checkpoint, or one saved with other training settings.
    """
    directory = run / CHECKPOINT
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"{directory}: no checkpoint to resume from (was --checkpoint-every 0?)")
    state = Checkpoint(**json.loads((directory / "state.json").read_text()))
    changed = sorted(k for k in settings if k in state.settings and state.settings[k] != settings[k])
    if changed:
        raise CheckpointError(f"{directory}: saved with other settings ({', '.join(changed)}); resume with the "
                              "same flags as the interrupted run")
    tensors = load_file(str(directory / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise CheckpointError(f"{directory}: its tensors do not match this model's trainable parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    saved = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    return state
