"""The offsite emulator matrix of ``bench_offsite.py --phase matrix`` (not a pytest test).

On the same eval rows (paired): full-model zero-shot; the split ceiling (the same edge adapter trained
against the real middle); and for each emulator construction its build time, share of the middle's
unique parameters, emulator zero-shot, emulator + adapter and plug-in (the adapter blocks on the full
model), with exact McNemar p-values against zero-shot. Every unit (one evaluation, one build, one
trained adapter) writes ``WORK/units/<name>.json`` as soon as it is done and is skipped when that file
exists, so the matrix is resumable and two workers can share it (``--units`` picks which ones run).
Frozen parts (the real middle, the emulator) run in bf16 in training and evaluation, as the demo runs
them; trainable adapters and distillation are fp32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cloud.store.emulators import EmulatorSpec, EmulatorStore, model_fingerprint
from edge.modes.split import LocalMiddle, score_examples, split_step
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters
from emulator.adapters.plugin import block_parameters
from emulator.data.datasets import load_eval, load_train, train_batches
from emulator.data.scoring import length_batches
from emulator.model.loading import load_causal_lm, load_tokenizer, resolve_model
from emulator.model.segments import split_causal_lm
from emulator.offsite.distill import DistillSettings
from emulator.offsite.stack import unique_parameters
from protocol.accounting import Traffic

MODEL = "smollm2-135m"
FROZEN = torch.bfloat16
# Paper loss (1 x LM + 30 x normalised MSE at the emulator's output), 100 steps of 8 x 64 tokens.
PAPER_KD = DistillSettings(steps=100, lr=5e-4, batch_size=8, seq_len=64, hidden_weight=30.0, warmup_steps=10)
# The same loss on a longer schedule: 300 steps of 8 x 64 tokens (154k tokens of the cloud's speeches).
PAPER_KD_LONG = DistillSettings(steps=300, lr=5e-4, batch_size=8, seq_len=64, hidden_weight=30.0, warmup_steps=20)


@dataclass(frozen=True)
class Emulator:
    name: str
    spec: EmulatorSpec
    seeds: tuple[int, ...] = (0,)
    # "lora" (both adapter ends), "lora-top" / "lora-bottom" (only that end's LoRA trained), "full"
    adapters: tuple[str, ...] = ("lora", "lora-top")
    seeded: tuple[str, ...] = ("lora", "lora-top")  # the kinds trained on every seed; the others on seeds[0]


TUNES = ("lora", "lora-top", "lora-bottom", "full")


@dataclass
class Matrix:
    eval_path: Path
    train_path: Path
    work: Path
    store: Path
    steps: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    emulators: list[Emulator] = field(default_factory=list)


def default_emulators() -> list[Emulator]:
    """The constructions measured (the first is the one given every seed and every adapter kind)."""
    return [
        Emulator("importance 2-8-2", EmulatorSpec(2, 8, selection="importance"), (0, 1, 2),
                 ("lora", "lora-top", "lora-bottom", "full")),
        Emulator("CRaSh 2-8-2", EmulatorSpec(2, 8, selection="crash")),
        Emulator("CRaSh 3-8-3 (3+3 adapter blocks)", EmulatorSpec(3, 8, selection="crash")),
        Emulator("uniform 2-8-2 (layer drop)", EmulatorSpec(2, 8)),
        Emulator("importance+bridges 2-8-2, paper KD 100 steps",
                 EmulatorSpec(2, 8, distill=PAPER_KD, selection="importance", bridge_rank=288)),
        Emulator("importance 2-13-2", EmulatorSpec(2, 13, selection="importance")),
        Emulator("importance 2-8-2, paper KD 300 steps", EmulatorSpec(2, 8, distill=PAPER_KD_LONG,
                                                                       selection="importance"), (0, 1, 2),
                 seeded=("lora-top",)),
    ]


def unit_order(emulators: list[Emulator]) -> list[tuple[Emulator, str, int]]:
    """(emulator, adapter kind, seed) in the order they run: the first construction's seeded kinds seed by
    seed, then its other kinds, then the other constructions."""
    first, rest = emulators[0], emulators[1:]
    order = [(first, t, first.seeds[0]) for t in first.adapters if t in first.seeded]
    order += [(first, t, s) for s in first.seeds[1:] for t in first.adapters if t in first.seeded]
    order += [(first, t, first.seeds[0]) for t in first.adapters if t not in first.seeded]
    for em in rest:
        order += [(em, t, s) for t in em.adapters for s in (em.seeds if t in em.seeded else em.seeds[:1])]
    seen: set[tuple[str, str, int]] = set()
    return [u for u in order if (u[0].name, u[1], u[2]) not in seen and not seen.add((u[0].name, u[1], u[2]))]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


class Units:
    """Per-unit result files under ``work/units``."""

    def __init__(self, work: Path) -> None:
        self.root = work / "units"
        self.root.mkdir(parents=True, exist_ok=True)

    def claim(self, name: str) -> bool:
        """Whether this worker takes the unit (atomically: the first worker to ask gets it)."""
        try:
            os.close(os.open(self.root / f"{slug(name)}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def get(self, name: str) -> dict | None:
        path = self.root / f"{slug(name)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, value: dict) -> dict:
        path = self.root / f"{slug(name)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"unit": name, **value}))
        tmp.replace(path)
        print(f"[matrix] {name}: " + json.dumps({k: v for k, v in value.items() if k != "correct"}), flush=True)
        return value

    def all(self) -> dict[str, dict]:
        out = {}
        for path in sorted(self.root.glob("*.json")):
            value = json.loads(path.read_text())
            out[value["unit"]] = value
        return out


def correct_rows(edge, middle, examples, pad_id: int, batch: int = 32) -> str:
    """Per-row correctness ("1"/"0", in the file's row order) of split inference with ``middle``."""
    link, result = LocalMiddle(middle), {}
    edge.eval()
    with torch.no_grad():
        for chunk in length_batches(examples, batch):
            for ex, pred in zip(chunk, score_examples(edge, link, chunk, pad_id, Traffic())):
                result[id(ex)] = pred == ex.answer
    return "".join("1" if result[id(ex)] else "0" for ex in examples)


def mcnemar(a: str, b: str) -> float:
    """Exact two-sided McNemar p of paired correctness strings (binomial on the discordant rows)."""
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def train_edge(edge, middle, data, pad_id: int, tune: str, steps: int, seed: int):
    """``steps`` steps of the edge's adapter (LoRA r=8 on all projections, lr 2e-4; ``lora-top`` /
    ``lora-bottom`` step only the top / bottom blocks' LoRA, the other end keeps B = 0; or the adapter
    blocks' full weights, lr 5e-5) against ``middle``; batch 8, constant lr after 10% warm-up."""
    from transformers import get_scheduler

    torch.manual_seed(seed)
    if tune.startswith("lora"):
        model = add_lora(edge, LoraSettings(8, 16, 0.0, ("all",)), edge.bottom.spec)
        end = tune.removeprefix("lora").removeprefix("-")
        params = [p for n, p in lora_parameters(model).items() if not end or n.startswith(end + ".")]
        lr = 2e-4
    else:
        model = copy.deepcopy(edge).requires_grad_(False)
        params, lr = list(block_parameters(model).values()), 5e-5
        for p in params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=max(1, steps // 10),
                              num_training_steps=steps)
    link, batches, losses = LocalMiddle(middle), train_batches(data, 8, pad_id, seed), []
    model.train()
    for step in range(1, steps + 1):
        ids, labels = next(batches)
        losses.append(split_step(model, link, step, ids, labels, Traffic()).loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), {"loss_first10": sum(losses[:10]) / 10, "loss_last10": sum(losses[-10:]) / 10}


def ceiling_name(seed: int, k: int = 2, tune: str = "lora") -> str:
    return f"ceiling K={k} seed {seed}" if tune == "lora" else f"ceiling K={k} {tune} seed {seed}"


class Runner:
    """Loads the model once and runs the units it is asked for."""

    def __init__(self, m: Matrix) -> None:
        self.m = m
        self.units = Units(m.work)
        self.model_dir = resolve_model(MODEL)
        self.model = load_causal_lm(self.model_dir).requires_grad_(False)
        self.tok = load_tokenizer(self.model_dir)
        self.eval = load_eval(m.eval_path, self.tok, 64).examples
        self.train = load_train(m.train_path, self.tok, 64)
        self.pad = self.tok.pad_token_id

    def split(self, k: int):
        split = split_causal_lm(self.model, k)
        return split.edge, split.middle.to(FROZEN)

    def zero_shot(self) -> dict:
        got = self.units.get("zero-shot")
        if got is None:
            edge, middle = self.split(2)
            t0 = time.perf_counter()
            got = self.units.put("zero-shot", {"correct": correct_rows(edge, middle, self.eval, self.pad),
                                               "eval_s": time.perf_counter() - t0})
        return got

    def ceiling(self, seed: int, k: int = 2, tune: str = "lora") -> None:
        """The same adapter trained against the real middle (``tune``: which LoRA trains, as offsite's)."""
        name = ceiling_name(seed, k, tune)
        if self.units.get(name) is not None:
            return
        edge, middle = self.split(k)
        t0 = time.perf_counter()
        tuned, losses = train_edge(edge, middle, self.train, self.pad, tune, self.m.steps, seed)
        train_s = time.perf_counter() - t0
        self.units.put(name, {"correct": correct_rows(tuned, middle, self.eval, self.pad), "train_s": train_s,
                              **losses})

    def build(self, em: Emulator):
        """The stored emulator (built now if missing; the build time of the first build is recorded)."""
        store = EmulatorStore(self.m.store)
        name = f"build {em.name}"
        t0 = time.perf_counter()
        stored = store.build(self.model, MODEL, model_fingerprint(self.model_dir), em.spec, self.tok)
        if self.units.get(name) is None and self.units.claim(name):  # one worker evaluates it
            emulator = stored.load(self.model)
            middle = split_causal_lm(self.model, em.spec.edge_layers).middle
            edge, _ = self.split(em.spec.edge_layers)
            self.units.put(name, {
                "key": stored.key, "build_s": stored.meta.get("build_s", time.perf_counter() - t0),
                "blocks": stored.blocks,
                "order": stored.meta.get("order"), "unique_share": unique_parameters(emulator) / unique_parameters(
                    middle), "kd_before": stored.meta.get("kd_before"), "kd_after": stored.meta.get("kd_after"),
                "correct": correct_rows(edge, emulator.to(FROZEN), self.eval, self.pad)})
        return stored

    def adapter(self, em: Emulator, tune: str, seed: int) -> None:
        name = f"{em.name} | {tune} | seed {seed}"
        if self.units.get(name) is not None:
            return
        stored = self.build(em)
        emulator = stored.load(self.model).to(FROZEN)
        edge, middle = self.split(em.spec.edge_layers)
        t0 = time.perf_counter()
        tuned, losses = train_edge(edge, emulator, self.train, self.pad, tune, self.m.steps, seed)
        train_s = time.perf_counter() - t0
        self.units.put(name, {"emulator_adapter": correct_rows(tuned, emulator, self.eval, self.pad),
                              "plug_in": correct_rows(tuned, middle, self.eval, self.pad), "train_s": train_s,
                              **losses})


def run(m: Matrix, which: str) -> None:
    """``which``: ``ceiling`` (zero-shot, then the ceiling's seeds), ``emulators`` (every emulator unit in
    priority order), ``all``, ``queue`` (every unit, in priority order, shared by any number of workers
    started with ``queue`` on the same ``--work``), or one more worker's share: ``builds`` (training-free
    emulators' builds and zero-shot only), ``emulator=TEXT`` (the units of the constructions whose name holds TEXT),
    ``ceiling-seeds=1,2`` (those ceiling seeds) or
    ``first-seeds=1,2`` (those LoRA seeds of the first emulator)."""
    r = Runner(m)
    if which == "builds":  # every training-free emulator's build and zero-shot unit, no adapters
        for em in m.emulators:
            if em.spec.distill is None:
                r.build(em)
        return
    if which == "queue":  # every unit in priority order; several workers share the queue by claiming units
        queue: list[tuple[str, object]] = [("zero-shot", None)]
        ceilings: list[tuple[str, object]] = [(ceiling_name(s), (s, "lora")) for s in m.seeds]
        units: list[tuple[str, object]] = [(f"{em.name} | {t} | seed {s}", (em, t, s))
                                           for em, t, s in unit_order(m.emulators)]
        per_seed = len([t for t in m.emulators[0].adapters if t in m.emulators[0].seeded])
        for i, ceiling in enumerate(ceilings):  # each ceiling seed beside the default's units of that seed
            queue += [ceiling] + units[i * per_seed:(i + 1) * per_seed]
        queue += units[len(ceilings) * per_seed:] + [(f"build {em.name}", em) for em in m.emulators]
        # the ceiling of top-only LoRA (the offsite default's adapter, trained against the real middle)
        queue += [(ceiling_name(s, tune="lora-top"), (s, "lora-top")) for s in m.seeds]
        for name, what in queue:
            # a build unit is claimed inside Runner.build (an adapter unit may build it first)
            if r.units.get(name) is not None or (not name.startswith("build ") and not r.units.claim(name)):
                continue
            if name == "zero-shot":
                r.zero_shot()
            elif name.startswith("ceiling"):
                seed, tune = what  # type: ignore[misc]
                r.ceiling(seed, tune=tune)
            elif name.startswith("build "):
                r.build(what)  # type: ignore[arg-type]
            else:
                assert isinstance(what, tuple)
                emulator, tune, seed = what
                r.build(emulator)
                r.adapter(emulator, tune, seed)
        return
    if which.startswith("emulator="):  # one construction's units, by its name (e.g. emulator=paper KD 300)
        wanted = which.split("=", 1)[1]
        for em, tune, seed in unit_order([e for e in m.emulators if wanted in e.name]):
            r.build(em)
            r.adapter(em, tune, seed)
        return
    if "=" in which:
        kind, seeds = which.split("=")
        for seed in (int(x) for x in seeds.split(",")):
            if kind == "ceiling-seeds":
                r.ceiling(seed)
            else:
                r.build(m.emulators[0])
                r.adapter(m.emulators[0], "lora", seed)
        return
    if which in ("ceiling", "all"):
        r.zero_shot()
        for seed in m.seeds:
            r.ceiling(seed)
    if which in ("emulators", "all"):
        for em, tune, seed in unit_order(m.emulators):
            r.build(em)
            r.adapter(em, tune, seed)


def summary(m: Matrix) -> dict:
    """Accuracies, McNemar p vs zero-shot and the emulators' table, from the unit files."""
    units = Units(m.work).all()
    zs = units.get("zero-shot")
    if zs is None:
        return {"units": {k: {kk: vv for kk, vv in v.items() if kk not in ("correct",)} for k, v in units.items()}}

    def acc(bits: str) -> float:
        return bits.count("1") / len(bits)

    def cell(bits: str | None) -> dict | None:
        return None if bits is None else {"accuracy": acc(bits), "p_vs_zero_shot": mcnemar(bits, zs["correct"])}

    out: dict = {"eval_rows": len(zs["correct"]), "zero_shot": acc(zs["correct"]), "steps": m.steps,
                 "ceiling": {}, "emulators": []}
    for key, tune in (("ceiling", "lora"), ("ceiling_top", "lora-top")):
        for seed in m.seeds:
            u = units.get(ceiling_name(seed, tune=tune))
            if u:
                out.setdefault(key, {})[seed] = {**cell(u["correct"]), "train_s": u["train_s"]}  # type: ignore
    for em in m.emulators:
        b = units.get(f"build {em.name}")
        if b is None:
            continue
        row = {"name": em.name, "spec": {k: v for k, v in em.spec.__dict__.items() if k != "distill"},
               "distill": em.spec.distill.__dict__ if em.spec.distill else None, "build_s": b["build_s"],
               "unique_share": b["unique_share"], "blocks": b["blocks"], "order": b["order"],
               "kd_before": b["kd_before"], "kd_after": b["kd_after"], "emulator_zero_shot": cell(b["correct"]),
               "adapters": []}
        for tune in TUNES:
            for seed in m.seeds:
                u = units.get(f"{em.name} | {tune} | seed {seed}")
                if u:
                    row["adapters"].append({"tune": tune, "seed": seed, "train_s": u["train_s"],
                                            "loss_last10": u["loss_last10"],
                                            "emulator_adapter": cell(u["emulator_adapter"]),
                                            "plug_in": cell(u["plug_in"])})
        out["emulators"].append(row)
    return out


def render(s: dict, command: str, threads: int) -> list[str]:
    """Markdown lines of the matrix summary."""
    if "zero_shot" not in s:
        return ["(the matrix has no zero-shot unit yet)"]

    def fmt(c: dict | None) -> str:
        return "—" if c is None else f"{c['accuracy']:.3f} (p={c['p_vs_zero_shot']:.2g})"

    zs = s["zero_shot"]
    ceil = [c["accuracy"] for c in s["ceiling"].values()]
    ceil_mean = sum(ceil) / len(ceil) if ceil else None
    lines = [f"Generated by `{command}` ({threads} torch thread per worker); {s['eval_rows']} paired eval rows; "
             f"{s['steps']} training steps of batch 8; frozen parts in bf16. p: exact McNemar vs zero-shot on the "
             "same rows.", "",
             "| | accuracy |", "|---|---|", f"| Full model, zero-shot | {zs:.3f} |"]
    for seed, c in s["ceiling"].items():
        lines.append(f"| Split ceiling (K=2, LoRA r=8 all projections, real middle), seed {seed} | {fmt(c)} |")
    for seed, c in s.get("ceiling_top", {}).items():
        lines.append(f"| Split ceiling of top-only LoRA (the same LoRA on the top 2 blocks only, real middle), "
                     f"seed {seed} | {fmt(c)} |")
    lines += ["", "| emulator | build s | unique share of middle | emulator zero-shot | adapter | seed | "
              "emulator + adapter | plug-in | plug-in gain over zero-shot | share of ceiling gap closed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in s["emulators"]:
        head = (f"| {e['name']} | {e['build_s']:.0f} | {e['unique_share']:.1%} | {fmt(e['emulator_zero_shot'])} ")
        if not e["adapters"]:
            lines.append(head + "| — | — | — | — | — | — |")
        for a in e["adapters"]:
            gain = a["plug_in"]["accuracy"] - zs
            closed = f"{gain / (ceil_mean - zs):.0%}" if ceil_mean and ceil_mean > zs else "—"
            lines.append(head + f"| {a['tune']} | {a['seed']} | {fmt(a['emulator_adapter'])} | {fmt(a['plug_in'])} "
                                f"| {gain * 100:+.1f} pts | {closed} |")
    return lines
