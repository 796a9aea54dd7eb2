"""Federated offsite rounds: FedAvg over adapters, weighted by each client's training examples.

One :class:`FederatedJob` runs ``rounds`` rounds. A round opens when ``clients_per_round`` clients
wait for it (or, after ``deadline_s`` of waiting, with however many wait); the cloud sends the
selected clients the current global adapter (they pull it from the registry), each trains locally
for ``local_steps`` and submits its adapter with its example count, and the round closes when all
selected clients reported or ``deadline_s`` after it opened, with those that did (clients that drop
out are tolerated). The new global adapter is
``sum(n_i * theta_i) / sum(n_i)`` over the reports (unchanged when nobody reported). Every
global adapter is registered and granted to the job's participants, so each of them can ``pull``
the final one. One client and one round is plain Offsite-Tuning.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from cloud.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, peft_config, save_adapter
from emulator.adapters.plugin import FORMAT_FILES, adapter_format, adapter_state
from emulator.model.arch import arch_for
from emulator.model.segments import extract_edge, plan_for
from protocol.types import AdapterMeta, RoundTask

log = logging.getLogger("edgetune.cloud")
Publish = Callable[[Path, int, bool], str]  # (adapter dir, round, final) -> registered adapter id
Grant = Callable[[str, str], None]  # (adapter id, identity)


@dataclass(frozen=True)
class FederatedSettings:
    """A FedAvg job, validated at construction."""

    rounds: int
    clients_per_round: int
    local_steps: int
    deadline_s: float = 600.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0

    def problems(self) -> list[str]:
        out = [f"{flag} {value}: must be at least 1" for flag, value in
               (("--rounds", self.rounds), ("--clients-per-round", self.clients_per_round),
                ("--local-steps", self.local_steps)) if value < 1]
        if not self.deadline_s > 0:
            out.append(f"--round-deadline {self.deadline_s}: must be positive")
        return out


def fedavg(updates: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Example-weighted average ``sum(n_i * state_i) / sum(n_i)`` of same-keyed state dicts (fp32).

    Raises:
        ValueError: no updates, a non-positive weight, or states whose keys or shapes differ.
    """
    if not updates or any(n <= 0 for n, _ in updates):
        raise ValueError("FedAvg needs at least one update, each with a positive example count")
    keys = set(updates[0][1])
    for _, state in updates[1:]:
        if set(state) != keys or any(state[k].shape != updates[0][1][k].shape for k in keys):
            raise ValueError("FedAvg updates must have identical tensor names and shapes")
    total = float(sum(n for n, _ in updates))
    return {k: sum((n / total) * state[k].float() for n, state in updates) for k in sorted(keys)}  # type: ignore[misc]


def initial_lora_adapter(model: PreTrainedModel, edge_layers: int, settings: LoraSettings, model_name: str,
                         out: Path, seed: int) -> Path:
    """The round-0 global adapter: fresh LoRA on the adapter blocks (A random with ``seed``, B zero)."""
    spec = arch_for(model.config)
    edge = extract_edge(model, plan_for(model.config, edge_layers))
    torch.manual_seed(seed)
    lora = add_lora(edge, settings, spec)
    save_adapter(out, adapter_state_dict(lora, spec), peft_config(lora, settings, spec, model_name))
    return out


class FederatedJob:
    """The round state machine of one job; thread-safe (the servicer calls it from many threads)."""

    def __init__(self, job_id: str, settings: FederatedSettings, workdir: Path, initial: Path,
                 publish: Publish, grant: Grant, clock: Callable[[], float] = time.monotonic) -> None:
        self.job_id, self.settings, self.workdir = job_id, settings, workdir
        self._publish, self._grant, self._clock = publish, grant, clock
        self._cond = threading.Condition()
        self.completed = 0  # rounds closed so far
        self.open_round = 0  # the round in progress (0: none)
        self.selected: set[str] = set()
        self.updates: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self.participants: set[str] = set()
        self.history: list[dict] = []
        self._waiting: dict[str, int] = {}  # identity -> the round it last finished
        self._first_wait: float | None = None
        self._opened_at = 0.0
        self._format = adapter_format(initial)
        self._global_dir = initial
        self._global_state = adapter_state(initial)
        self.global_id = publish(initial, 0, False)

    @property
    def finished(self) -> bool:
        return self.completed >= self.settings.rounds

    def next_round(self, owner: str, after_round: int, wait_s: float) -> RoundTask:
        """Blocks up to ``wait_s`` until ``owner`` is selected for a round after ``after_round``."""
        wait_until = self._clock() + max(0.0, wait_s)
        with self._cond:
            self.participants.add(owner)
            while True:
                if self.finished:
                    self._waiting.pop(owner, None)
                    return self._task(owner, finished=True)
                if self.open_round > after_round and owner in self.selected and owner not in self.updates:
                    return self._task(owner)
                self._waiting[owner] = after_round
                self._maybe_open()
                if self.open_round > after_round and owner in self.selected:
                    continue
                remaining = wait_until - self._clock()
                if remaining <= 0:
                    self._waiting.pop(owner, None)
                    return RoundTask(self.job_id, rounds=self.settings.rounds, local_steps=self.settings.local_steps)
                self._cond.wait(min(remaining, 1.0))  # wake up to apply the start deadline

    def submit(self, owner: str, meta: AdapterMeta, staged: Path) -> AdapterMeta:
        """Accepts a selected client's update for the open round; closes the round when all reported."""
        with self._cond:
            if meta.job_id != self.job_id or meta.round != self.open_round or self.open_round == 0:
                raise FailedPrecondition(f"round {meta.round} of job {meta.job_id!r} is not open (open: "
                                         f"{self.open_round or 'none'}); the deadline may have passed")
            if owner not in self.selected:
                raise PermissionDenied(f"identity {owner!r} was not selected for round {meta.round}")
            if owner in self.updates:
                raise FailedPrecondition(f"identity {owner!r} already submitted round {meta.round}")
            if meta.num_examples < 1:
                raise InvalidArgument("an update must state its number of training examples (>= 1)")
            state = adapter_state(staged)
            try:
                fedavg([(1, self._global_state), (1, state)])
            except ValueError:
                raise InvalidArgument("update does not match the global adapter (same --edge-layers?)") from None
            self.updates[owner] = (meta.num_examples, state)
            if set(self.updates) == self.selected:
                self._close()
            return meta

    def close_if_due(self) -> None:
        """Applies the round deadline (called by a timer; safe to call any time)."""
        with self._cond:
            if self.open_round and self._clock() - self._opened_at >= self.settings.deadline_s:
                self._close()

    def _maybe_open(self) -> None:
        if self.open_round or self.finished:
            return
        candidates = sorted(o for o, done in self._waiting.items() if done <= self.completed)
        if not candidates:
            return
        now = self._clock()
        self._first_wait = self._first_wait if self._first_wait is not None else now
        want = self.settings.clients_per_round
        if len(candidates) < want and now - self._first_wait < self.settings.deadline_s:
            return
        number = self.completed + 1
        self.selected = set(random.Random(self.settings.seed * 7919 + number).sample(candidates,
                                                                                     min(want, len(candidates))))
        self.open_round, self.updates, self._opened_at, self._first_wait = number, {}, now, None
        for owner in self.selected:
            self._waiting.pop(owner, None)
        log.info("job %s: round %d opened for %s", self.job_id, number, sorted(self.selected))
        timer = threading.Timer(self.settings.deadline_s + 0.05, self.close_if_due)
        timer.daemon = True
        timer.start()
        self._cond.notify_all()

    def _close(self) -> None:
        number, reported = self.open_round, sorted(self.updates)
        if self.updates:
            self._global_state = fedavg(list(self.updates.values()))
            self._global_dir = self._write_global(number)
        else:
            log.warning("job %s: round %d closed with no updates; the global adapter is unchanged", self.job_id,
                        number)
        self.completed, self.open_round = number, 0
        self.global_id = self._publish(self._global_dir, number, self.finished)
        if self.finished:  # every participant may pull the final adapter, also one that dropped out
            for owner in self.participants:
                self._grant(self.global_id, owner)
        self.history.append({"round": number, "selected": sorted(self.selected), "reported": reported,
                             "examples": {o: n for o, (n, _) in self.updates.items()},
                             "global_adapter_id": self.global_id})
        log.info("job %s: round %d closed with %d/%d updates", self.job_id, number, len(reported), len(self.selected))
        self.selected, self.updates = set(), {}
        self._cond.notify_all()
        self._maybe_open()

    def _write_global(self, number: int) -> Path:
        config_name, weights_name = FORMAT_FILES[self._format]
        directory = self.workdir / f"round-{number}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        shutil.copyfile(self._global_dir / config_name, directory / config_name)
        save_file({k: v.contiguous() for k, v in self._global_state.items()}, str(directory / weights_name),
                  metadata={"format": "pt"})
        return directory

    def _task(self, owner: str, finished: bool = False) -> RoundTask:
        self._grant(self.global_id, owner)
        remaining = 0.0 if finished else self.settings.deadline_s - (self._clock() - self._opened_at)
        return RoundTask(self.job_id, 0 if finished else self.open_round, self.settings.rounds,
                         self.settings.local_steps, self.global_id, finished, max(0.0, remaining))

    def summary(self) -> str:
        return json.dumps({"job_id": self.job_id, "completed": self.completed, "history": self.history})
