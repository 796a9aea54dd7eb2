"""Per-module accounting of a run and the plot written next to ``metrics.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.modes.dlora import LoraModules, SiteLedger, lora_step_flops
from edge.modes.kill_revive import KillRevive
from edge.training.metrics import StepRecord


@dataclass
class ModuleTally:
    """Steps each module was computed and its LoRA FLOPs (:func:`edge.modes.dlora.lora_step_flops`)."""

    modules: LoraModules
    rank: int
    steps_active: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)

    def add(self, active: frozenset[str], tokens: int) -> int:
        """Counts one training step; returns its LoRA FLOPs."""
        total = 0
        for name in active:
            flops = lora_step_flops(tokens, self.rank, *self.modules.dims(name))
            self.steps_active[name] = self.steps_active.get(name, 0) + 1
            self.flops[name] = self.flops.get(name, 0) + flops
            total += flops
        return total


def module_rows(tally: ModuleTally, kr: KillRevive, ledger: SiteLedger | None) -> list[dict[str, Any]]:
    """One row per LoRA module: placement, steps computed, FLOPs, score, kills/revives and traffic.

    A cloud-held module's exchanges are those of its group it took part in; its bytes are its equal
    share of each such exchange (so the rows' bytes add up to the site traffic).
    """
    rows = []
    for name in tally.modules.names:
        row: dict[str, Any] = {
            "module": name, "placement": tally.modules.placement(name),
            "steps_active": tally.steps_active.get(name, 0), "lora_flops": tally.flops.get(name, 0),
            "score": kr.scores.get(name), "kills": sum(e.module == name and e.kind == "kill" for e in kr.events),
            "revives": sum(e.module == name and e.kind == "revive" for e in kr.events)}
        if ledger is not None and row["placement"] == "cloud":
            row.update(exchanges=ledger.exchanges.get(name, 0), bytes_sent=round(ledger.bytes_sent.get(name, 0)),
                       bytes_received=round(ledger.bytes_received.get(name, 0)))
        rows.append(row)
    return rows


def write_plot(steps: Sequence[StepRecord], path: Path, title: str) -> None:
    """PNG of active LoRA modules and training bytes (sent + received) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s.step for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    top.step(x, [s.active_modules for s in steps], where="mid", color="tab:blue")
    top.set_ylabel("active LoRA modules")
    top.set_title(title)
    bottom.bar(x, [(s.traffic.bytes_sent + s.traffic.bytes_received) / 1e6 for s in steps], color="tab:orange")
    bottom.set_ylabel("MB per step (up + down)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
