"""Kill-and-Revive: which LoRA modules a dlora step computes (docs/dlora.md states the rules).

* Importance of module ``m``: ``s_m``, an exponential moving average (factor ``ema``) over the steps
  that computed it of one of two measurements (``score``):
  ``grad``, the gradient norm ``||g_m|| = sqrt(||dL/dA_m||^2 + ||dL/dB_m||^2)``: under SGD one step
  lowers the loss by about ``lr * ||g_m||^2``, so a module whose gradients vanish has nothing left to
  learn from this data; or ``taylor``, ``|<dL/dB_m, B_m>|``, the first-order change of the loss if the
  module's learnt update ``B_m A_m`` were taken away (zero until ``B_m`` has moved off zero).
* Warm-up: the first ``warmup`` steps compute (and train) every module, so the first ranking rests
  on a moving average over that many steps and not on the first step alone, where LoRA's zero-initialised
  ``B`` makes every ``dL/dA`` zero.
* Probe steps (the last warm-up step, then every ``probe_every`` steps) compute every module. A module
  coming back from killed restarts its average at the probe's measurement.
* Kill / revive rule, applied after each probe: the ``ceil(budget * modules)`` highest-scoring
  modules stay active until the next probe; the others are killed; a killed module whose probe score
  now ranks among them is revived. ``budget`` 1.0 keeps every module active (Kill-and-Revive off).
* A killed module contributes nothing to training steps and is not updated, not even by the probe
  step that measures it (see :class:`edge.modes.dlora.LoraModules`); its weights stay on the edge as they
  were when it was killed and are part of the saved adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KillReviveConfig:
    """``--kr-budget``, ``--kr-probe-every``, ``--kr-ema``, ``--kr-warmup``; see :meth:`problems`."""

    budget: float = 1.0
    probe_every: int = 50
    ema: float = 0.9
    warmup: int = 20
    score: str = "grad"  # "grad" (gradient norm) or "taylor" (|<dL/dB, B>|), see LoraModules.importance

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.budget <= 1:
            out.append(f"--kr-budget {self.budget}: must be a fraction in (0, 1]")
        if self.probe_every < 1:
            out.append(f"--kr-probe-every {self.probe_every}: must be at least 1")
        if not 0 <= self.ema < 1:
            out.append(f"--kr-ema {self.ema}: must be in [0, 1)")
        if self.score not in ("grad", "taylor"):
            out.append(f"--kr-score {self.score!r}: choose grad or taylor")
        if self.warmup < 1:
            out.append(f"--kr-warmup {self.warmup}: must be at least 1 (the first ranking needs a measured step)")
        return out

    @property
    def enabled(self) -> bool:
        return self.budget < 1


@dataclass(frozen=True)
class StepPlan:
    """The modules a step computes, and whether it is a probe step."""

    active: frozenset[str]
    probe: bool


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # "kill" or "revive"
    module: str


@dataclass
class KillRevive:
    """The Kill-and-Revive state over one run's modules (names in a fixed order, ties go to the first)."""

    modules: Sequence[str]
    config: KillReviveConfig = field(default_factory=KillReviveConfig)
    scores: dict[str, float] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.active = frozenset(self.modules)
        self._order = {m: i for i, m in enumerate(self.modules)}

    @property
    def budget(self) -> int:
        return max(1, math.ceil(self.config.budget * len(self.modules)))

    def plan(self, step: int) -> StepPlan:
        """What step ``step`` (1-based) computes."""
        if not self.config.enabled:
            return StepPlan(frozenset(self.modules), False)
        warmup = self.config.warmup
        if step < warmup:
            return StepPlan(frozenset(self.modules), False)
        if (step - warmup) % self.config.probe_every == 0:
            return StepPlan(frozenset(self.modules), True)
        return StepPlan(self.active, False)

    def observe(self, step: int, plan: StepPlan, grad_norms: Mapping[str, float]) -> None:
        """Updates scores from a step's gradient norms; after a probe, kills and revives."""
        beta = self.config.ema
        for name in plan.active:
            g = grad_norms.get(name, 0.0)
            old = self.scores.get(name)
            self.scores[name] = g if old is None or name not in self.active else beta * old + (1 - beta) * g
        if plan.probe:
            self._rerank(step)

    def _rerank(self, step: int) -> None:
        ranked = sorted(self.modules, key=lambda m: (-self.scores.get(m, 0.0), self._order[m]))
        keep = frozenset(ranked[:self.budget])
        self.events += [Event(step, "kill", m) for m in self.modules if m in self.active - keep]
        self.events += [Event(step, "revive", m) for m in self.modules if m in keep - self.active]
        self.active = keep
