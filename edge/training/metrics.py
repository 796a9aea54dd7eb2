"""Run accounting on the edge: FLOPs, memory, time and traffic, written to ``RUN/metrics.json``."""

from __future__ import annotations

import json
import resource
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

from protocol.accounting import Traffic


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process image.
    ``getrusage``'s ``ru_maxrss`` is the fallback elsewhere; on Linux it survives ``exec``, so a
    process started by a large parent would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FlopMeter:
    """Counts the FLOPs of the torch operations run inside :meth:`measure` (forward and backward)."""

    def __init__(self) -> None:
        self.total = 0

    @contextmanager
    def measure(self):
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.last = counter.get_total_flops()
        self.total += self.last


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens: int
    edge_flops: int
    cloud_compute_s: float
    wall_s: float
    traffic: Traffic
    active_modules: int = 0  # LoRA modules computed this step (all of them unless Kill-and-Revive)
    site_exchanges: int = 0  # dlora: site round trips this step (round_trips minus the two cut crossings)
    lora_flops: int = 0  # FLOPs of the LoRA branches computed this step (edge-held and cloud-held)
    probe: bool = False  # a Kill-and-Revive probe step (every module computed)

    def as_dict(self) -> dict[str, Any]:
        row = {k: v for k, v in asdict(self).items() if k != "traffic"}
        row.update(self.traffic.as_dict())
        return row

    def as_record(self) -> dict[str, Any]:
        """Lossless form for checkpoints (see :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> StepRecord:
        return cls(**{**row, "traffic": Traffic(**row["traffic"])})


@dataclass
class RunMetrics:
    """Everything ``metrics.json`` reports; top-level names are a stable interface for scripts."""

    mode: str
    settings: dict[str, Any]
    adapter_id: str = ""
    setup: Traffic = field(default_factory=Traffic)
    train: Traffic = field(default_factory=Traffic)
    upload: Traffic = field(default_factory=Traffic)  # adapter uploads outside the training phase
    eval: Traffic = field(default_factory=Traffic)
    steps: list[StepRecord] = field(default_factory=list)
    wall_s: float = 0.0
    eval_accuracy_before: float | None = None
    eval_accuracy_after: float | None = None
    eval_rows: int = 0
    train_rows: int = 0
    truncated_rows: int = 0
    modules: list[dict[str, Any]] = field(default_factory=list)  # per-module rows, see edge/training/module_report.py
    kr_events: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # mode-specific fields, merged at the top level

    def as_dict(self) -> dict[str, Any]:
        steps = self.steps
        out: dict[str, Any] = {
            "adapter_id": self.adapter_id,
            "mode": self.mode,
            "steps": len(steps),
            "tokens": sum(s.tokens for s in steps),
            "loss_first": steps[0].loss if steps else None,
            "loss_last": steps[-1].loss if steps else None,
            **{k: v for k, v in self.train.as_dict().items() if not k.startswith("messages")},
            "edge_flops": sum(s.edge_flops for s in steps),
            "lora_flops": sum(s.lora_flops for s in steps),
            "site_exchanges": sum(s.site_exchanges for s in steps),
            "active_modules_mean": sum(s.active_modules for s in steps) / len(steps) if steps else 0.0,
            "lora_modules": len(self.modules),
            "cloud_compute_s": sum(s.cloud_compute_s for s in steps),
            "wall_s": self.wall_s,
            "train_wall_s": sum(s.wall_s for s in steps),
            "tokens_per_s": _ratio(sum(s.tokens for s in steps), sum(s.wall_s for s in steps)),
            "edge_peak_rss_mb": peak_rss_mb(),
            "train_rows": self.train_rows,
            "truncated_rows": self.truncated_rows,
            **self.setup.as_dict("setup_"),
            **self.upload.as_dict("upload_"),
        }
        if self.eval_accuracy_before is not None or self.eval_accuracy_after is not None:
            out.update(eval_accuracy_before=self.eval_accuracy_before,
                       eval_accuracy_after=self.eval_accuracy_after, eval_rows=self.eval_rows,
                       **self.eval.as_dict("eval_"))
        out.update(self.extra)
        out["settings"] = self.settings
        out["per_module"] = self.modules
        out["kr_events"] = self.kr_events
        out["per_step"] = [s.as_dict() for s in steps]
        return out

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2))
        tmp.replace(path)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
