"""Knowledge distillation of an emulator into the middle it replaces, on text the cloud owns.

The teacher is the full middle; the student is the (layer-dropped) emulator; the edge segments
(embedding, first and last K blocks, norm and head) are frozen and shared by both. For a batch of
token ids ``x``::

    h    = bottom(x)                                  # (batch, seq, hidden), no grad
    t    = teacher(h)                                 # the full middle's output, no grad
    s    = student(h)                                 # the emulator's output
    loss = CE(head(top(s)), next tokens) + w * mean(((t - s) / rms(t)) ** 2)

with ``rms(t)`` the root-mean-square of each position's teacher state over the hidden dimension, so
the hidden term is scale-free. Only the student's parameters are trained. Everything is computed
explicitly from the segments; no module's ``forward`` is patched.

:func:`distill` returns a new student and never modifies its inputs. With a checkpoint directory it
saves every ``checkpoint_every`` steps and resumes from the last save (batches depend only on the
seed and the step, see :func:`emulator.offsite.corpus.chunk_batch`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from emulator.model.segments import BlockStack, EdgeModel
from emulator.offsite.corpus import chunk_batch
from protocol.fileio import recover_directory, replace_directory

_STUDENT, _OPTIMIZER, _STATE = "student.safetensors", "optimizer.pt", "state.json"


@dataclass(frozen=True)
class DistillSettings:
    """Hyper-parameters of emulator distillation (part of the emulator's cache key)."""

    steps: int = 300
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 64
    hidden_weight: float = 1.0
    warmup_steps: int = 20
    clip: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        out = [f"--distill-{k.replace('_', '-')} {v}: must be at least 1" for k, v in
               (("steps", self.steps), ("batch_size", self.batch_size)) if v < 1]
        if self.seq_len < 2:
            out.append(f"--distill-seq-len {self.seq_len}: must be at least 2")
        if not self.lr > 0:
            out.append(f"--distill-lr {self.lr}: must be positive")
        if self.hidden_weight < 0:
            out.append(f"--hidden-weight {self.hidden_weight}: must be non-negative")
        return out


@dataclass(frozen=True)
class KDLoss:
    """The distillation loss of one batch and its two terms (floats)."""

    total: float
    ce: float
    hidden: float


@dataclass
class DistillResult:
    student: BlockStack
    start_step: int  # > 0 when the run resumed from a checkpoint
    history: list[dict] = field(default_factory=list)  # {"step", "total", "ce", "hidden"} per step


def kd_loss(edge: EdgeModel, teacher: BlockStack, student: BlockStack, input_ids: torch.Tensor,
            hidden_weight: float) -> tuple[torch.Tensor, KDLoss]:
    """The distillation loss of a batch of ``(batch, seq)`` token ids (graph only through ``student``)."""
    with torch.no_grad():
        hidden = edge.bottom(input_ids)
        target = teacher(hidden)
    out = student(hidden)
    features = edge.top.features(out)[:, :-1]
    assert edge.top.lm_head is not None
    logits = edge.top.lm_head(features).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    rms = target.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
    mse = ((target - out) / rms).pow(2).mean()
    total = ce + hidden_weight * mse
    return total, KDLoss(total.item(), ce.item(), mse.item())


@torch.no_grad()
def evaluate_kd(edge: EdgeModel, teacher: BlockStack, student: BlockStack, chunks: torch.Tensor,
                hidden_weight: float, batch_size: int = 8) -> KDLoss:
    """Mean distillation loss over ``chunks`` ``(n, seq)`` (e.g. held-out text)."""
    sums, n = [0.0, 0.0, 0.0], 0
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i:i + batch_size]
        _, loss = kd_loss(edge, teacher, student, batch, hidden_weight)
        for j, v in enumerate((loss.total, loss.ce, loss.hidden)):
            sums[j] += v * len(batch)
        n += len(batch)
    return KDLoss(*(s / n for s in sums))


def distill(edge: EdgeModel, teacher: BlockStack, student: BlockStack, chunks: torch.Tensor,
            settings: DistillSettings, checkpoint: Path | None = None, checkpoint_every: int = 50,
            stop_after: int | None = None, progress: bool = True,
            on_step: Callable[[int, KDLoss], None] | None = None) -> DistillResult:
    """Trains a copy of ``student`` to imitate ``teacher`` on ``chunks`` ``(n, seq_len)`` of token ids.

    Args:
        checkpoint: directory to save to and resume from (``None``: no checkpoints).
        stop_after: stop (with a checkpoint) after this step, as an interruption would.

    Returns:
        The trained student (a new module), the step it resumed from and the per-step losses.
    """
    edge = copy.deepcopy(edge).eval().requires_grad_(False)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(student).float().train().requires_grad_(True)
    params = list(student.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings))
    start, history = _resume(checkpoint, settings, student, optimizer, scheduler)
    last = settings.steps if stop_after is None else min(stop_after, settings.steps)
    with tqdm(range(start + 1, last + 1), desc="distill", unit="step", disable=not progress,
              initial=start, total=settings.steps) as bar:
        for step in bar:
            batch = chunk_batch(chunks, settings.batch_size, settings.seed, step)
            loss, parts = kd_loss(edge, teacher, student, batch, settings.hidden_weight)
            loss.backward()
            if settings.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, **asdict(parts)})
            bar.set_postfix(ce=f"{parts.ce:.3f}", hidden=f"{parts.hidden:.3f}")
            if on_step is not None:
                on_step(step, parts)
            if checkpoint is not None and (step % checkpoint_every == 0 or step == last):
                _save(checkpoint, settings, step, student, optimizer, scheduler, history)
    return DistillResult(student.eval().requires_grad_(False), start, history)


def _warmup_cosine(settings: DistillSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        span = max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))
    return factor


def _save(directory: Path, settings: DistillSettings, step: int, student: BlockStack,
          optimizer: torch.optim.Optimizer, scheduler, history: list[dict]) -> None:
    """Writes a checkpoint crash-safely: the new one is complete before the old one is renamed aside
    (:func:`protocol.fileio.replace_directory`), so a crash never leaves no checkpoint."""

    def fill(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(tmp / _STUDENT))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / _OPTIMIZER)
        (tmp / _STATE).write_text(json.dumps({"step": step, "settings": asdict(settings), "history": history}))

    replace_directory(directory, fill)


def _resume(directory: Path | None, settings: DistillSettings, student: BlockStack,
            optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, list[dict]]:
    """Loads the checkpoint in ``directory`` if it was written with the same settings."""
    if directory is not None:
        recover_directory(directory)  # a crash between the two renames of _save
    if directory is None or not (directory / _STATE).is_file():
        return 0, []
    state = json.loads((directory / _STATE).read_text())
    if state["settings"] != asdict(settings):
        raise ValueError(f"{directory}: checkpoint of other distillation settings; delete it to start over")
    student.load_state_dict(load_file(str(directory / _STUDENT)))
    saved = torch.load(directory / _OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(state["step"]), list(state["history"])
