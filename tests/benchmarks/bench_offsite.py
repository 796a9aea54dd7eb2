"""Offsite-Tuning benchmark on SmolLM2-135M and one client's Rotten Tomatoes data (not a pytest test).

Side by side, on the same eval rows (paired) and the same training batches: full-model zero-shot,
emulator zero-shot before and after distillation, emulator + offsite adapter, plug-in (full model +
offsite adapter), and full-model LoRA with the same data and steps (the reference); edge tokens/s,
FLOPs and peak memory of offsite training vs full-model LoRA (each in its own process, so peak RSS
is its own), and the bytes each mode moves. ``--phase all`` runs every phase in one invocation,
one after the other on the same machine state (the way the numbers in docs/ are made):

    python tests/benchmarks/bench_offsite.py --phase all --store ~/.cache/edgetune/demo-cloud-store

``--phase matrix`` measures the emulator constructions side by side (see ``offsite_matrix.py``): zero-shot,
the split ceiling and, per emulator, emulator zero-shot, emulator + adapter, plug-in, build time and
unique-parameter share, with McNemar p against zero-shot; resumable units, shared by several workers:

    python tests/benchmarks/bench_offsite.py --phase matrix --units ceiling --eval-rows 500 --steps 100 --threads 1
    python tests/benchmarks/bench_offsite.py --phase matrix --units emulators --eval-rows 500 --steps 100 --threads 1
    python tests/benchmarks/bench_offsite.py --phase matrix --units first-seeds=1,2 --eval-rows 500 --steps 100 \
        --threads 1
    python tests/benchmarks/bench_offsite.py --phase matrix --units report --eval-rows 500 --steps 100

``--phase speed`` measures the edge's training speed and memory on its own: offsite against the default
emulator (``--tune lora`` and ``lora-top``, the emulator in fp32 and bf16) and full-model LoRA, each in its own
process (so its peak RSS is its own), the same batches and steps, every setting twice in mirrored order:

    python tests/benchmarks/bench_offsite.py --phase speed --steps 30 --threads 2

Results go to ``docs/offsite_benchmark.json`` and are rendered to ``docs/offsite_benchmark.md`` after
every phase, so a partial run leaves what it measured; a single phase can be redone on its own with
``--phase zero-shot|offsite|plug-in|full-lora``. The data is one client's Rotten Tomatoes partition
(prepared into ``--data`` if missing). The distilled emulator must be in ``--store`` first (the demo
builds it there; resumable, cached):
    edgetune-cloud emulator build --model smollm2-135m --edge-layers 2 --emulator-layers 8 \
        --distill-data speeches --distill-steps 120 --distill-lr 5e-4 --distill-warmup 10 --store STORE
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cloud.store.emulators import EmulatorSpec, EmulatorStore, model_fingerprint  # noqa: E402
from edge.modes.offsite import load_kit  # noqa: E402
from edge.modes.split import LocalMiddle, split_step  # noqa: E402
from edge.training.metrics import FlopMeter, peak_rss_mb  # noqa: E402
from edge.training.recipes import TrainConfig, evaluate  # noqa: E402
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters  # noqa: E402
from emulator.adapters.plugin import apply_to_edge  # noqa: E402
from emulator.data.datasets import IGNORE, load_eval, load_train, train_batches  # noqa: E402
from emulator.model.arch import arch_for  # noqa: E402
from emulator.model.bundle import bundle_files, read_plan, write_bundle  # noqa: E402
from emulator.model.loading import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402
from emulator.model.segments import plan_for, split_causal_lm  # noqa: E402
from protocol.accounting import Traffic  # noqa: E402

MODEL = "smollm2-135m"
OUT_JSON, OUT_MD = REPO / "docs" / "offsite_benchmark.json", REPO / "docs" / "offsite_benchmark.md"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", required=True, choices=["all", "zero-shot", "offsite", "plug-in", "full-lora",
                                                      "report", "_train-offsite", "_train-full", "matrix", "speed",
                                                      "_speed-offsite", "_speed-full"])
    p.add_argument("--units", default="all",
                   help="matrix: which units this worker runs: all, ceiling, emulators, report, ceiling-seeds=1,2 "
                        "first-seeds=1,2, emulator=TEXT or queue (several workers may share --work)")
    p.add_argument("--data", type=Path, default=Path("/tmp/rt/client0"))
    p.add_argument("--store", type=Path, default=Path("/tmp/offs/store"))
    p.add_argument("--work", type=Path, default=Path("/tmp/offs/bench"))
    p.add_argument("--edge-layers", type=int, default=2)
    p.add_argument("--emulator-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-targets", default="all")
    p.add_argument("--eval-rows", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every phase (set explicitly)")
    # internal: what one --phase speed child measures and where it writes it
    p.add_argument("--tune", default="lora", choices=["lora", "lora-top"], help=argparse.SUPPRESS)
    p.add_argument("--emulator-dtype", default="float32", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--speed-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def results() -> dict:
    return json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}


def record(section: str, values: dict) -> None:
    data = results()
    data[section] = values
    OUT_JSON.write_text(json.dumps(data, indent=2))
    OUT_MD.write_text(render(data))
    print(json.dumps({section: values}, indent=2), flush=True)


def eval_subset(args) -> Path:
    """The first ``--eval-rows`` rows of the client's eval file (the same rows for every model)."""
    path = args.work / f"eval-{args.eval_rows}.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    lines = (args.data / "eval.jsonl").read_text().splitlines()[: args.eval_rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def emulators(args) -> dict[str, object]:
    store, model_dir = EmulatorStore(args.store), resolve_model(MODEL)
    found = store.find(model_fingerprint(model_dir), args.edge_layers, args.emulator_layers)
    return {"distilled": found if found is not None and found.distilled else None}


def phase_zero_shot(args) -> None:
    model_dir = resolve_model(MODEL)
    model = load_causal_lm(model_dir).requires_grad_(False)
    tok = load_tokenizer(model_dir)
    data = load_eval(eval_subset(args), tok, args.seq_len)
    split = split_causal_lm(model, args.edge_layers)
    out = {"eval_rows": len(data.examples), "model": MODEL, "edge_layers": args.edge_layers,
           "emulator_layers": args.emulator_layers,
           "majority_class": max(sum(ex.answer == c for ex in data.examples) for c in (0, 1)) / len(data.examples)}
    t0 = time.perf_counter()
    out["full_zero_shot"] = evaluate(split.edge, LocalMiddle(split.middle), data, tok.pad_token_id, 32, Traffic())
    out["full_eval_s"] = time.perf_counter() - t0
    store, fp = EmulatorStore(args.store), model_fingerprint(model_dir)
    drop = store.build(model, MODEL, fp, EmulatorSpec(args.edge_layers, args.emulator_layers), progress=False)
    out["emulator_blocks"] = drop.blocks
    out["layer_drop_zero_shot"] = evaluate(split.edge, LocalMiddle(drop.load(model)), data, tok.pad_token_id, 32,
                                           Traffic())
    distilled = emulators(args)["distilled"]
    if distilled is not None:
        out["distilled_zero_shot"] = evaluate(split.edge, LocalMiddle(distilled.load(model)), data,
                                              tok.pad_token_id, 32, Traffic())
        out["distill"] = {k: distilled.meta.get(k) for k in ("key", "distill", "distill_data", "kd_before", "kd_after",
                                                             "train_chunks", "held_out_chunks")}
        bundle = write_bundle(model, model_dir, plan_for(model.config, args.edge_layers), args.store / "bundles",
                              MODEL, distilled.load(model), distilled.public_meta())
        out["offsite_bundle_dir"] = str(bundle)
        out["offsite_bundle_bytes"] = sum(p.stat().st_size for p in bundle_files(bundle))
    split_bundle = write_bundle(model, model_dir, plan_for(model.config, args.edge_layers), args.store / "bundles",
                                MODEL)
    out["split_bundle_bytes"] = sum(p.stat().st_size for p in bundle_files(split_bundle))
    record("zero_shot", out)


def train_config(args) -> TrainConfig:
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    return TrainConfig(cloud="-", identity=args.work, data=args.data / "train.jsonl", out=args.work / "offsite-run",
                       mode="offsite", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       warmup_steps=max(1, args.steps // 10), schedule="constant_with_warmup",
                       lora=LoraSettings(8, 16, 0.0, targets), seed=args.seed)


def timed_loop(step_fn, params, batches, cfg) -> dict:
    """Runs ``cfg.steps`` steps; returns tokens/s, FLOPs/step and losses (the first 3 steps are warm-up)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    meter, losses, tokens, wall, warm = FlopMeter(), [], 0, 0.0, 3
    for step in range(1, cfg.steps + 1):
        ids, labels = next(batches)
        t0 = time.perf_counter()
        with meter.measure():
            loss = step_fn(step, ids, labels)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step > warm:
            wall += time.perf_counter() - t0
            tokens += ids.numel()
        losses.append(loss)
        if step % 25 == 0:
            print(f"step {step}: loss {sum(losses[-25:]) / 25:.3f}, {tokens / max(wall, 1e-9):.0f} tok/s", flush=True)
    return {"tokens_per_s": tokens / wall, "flops_per_step": meter.total / cfg.steps, "loss_first": losses[0],
            "loss_last10": sum(losses[-10:]) / 10, "train_s": wall, "steps": cfg.steps}


def child_offsite(args) -> None:
    """Edge-side offsite training: only the bundle (embedding, adapter blocks, emulator) in memory."""
    bundle = Path(results()["zero_shot"]["offsite_bundle_dir"])
    kit = load_kit(bundle)
    cfg = train_config(args)
    data = load_train(cfg.data, kit.tokenizer, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    model = add_lora(kit.edge, cfg.lora, kit.spec)
    link = kit.link()
    out = timed_loop(lambda s, i, lab: split_step(model, link, s, i, lab, Traffic()).loss,
                     list(lora_parameters(model).values()), train_batches(data, cfg.batch_size, kit.pad_id, cfg.seed),
                     cfg)
    out["peak_rss_mb"] = peak_rss_mb()
    from edge.modes.offsite import save_trained

    adapter = save_trained(model, kit, cfg, args.work / "offsite-adapter")
    out["adapter_dir"], out["adapter_bytes"] = str(adapter), sum(p.stat().st_size for p in adapter.iterdir())
    eval_data = load_eval(eval_subset(args), kit.tokenizer, cfg.seq_len)
    out["emulator_adapter"] = evaluate(model, link, eval_data, kit.pad_id, 32, Traffic())
    out["train_rows"] = len(data.examples)
    out["split_payload_bytes"] = split_payload(data, cfg, kit.pad_id, kit.edge.top.lm_head.in_features)
    record("offsite", out)


def split_payload(data, cfg, pad_id, hidden) -> int:
    """What split mode would move for the same batches: 4 crossings of batch x seq x hidden x 4 bytes."""
    batches = train_batches(data, cfg.batch_size, pad_id, cfg.seed)
    return sum(4 * next(batches)[0].numel() * hidden * 4 for _ in range(cfg.steps))


def full_loss(model, ids, labels) -> torch.Tensor:
    """Completion loss of the whole model, with logits only at labelled positions (as the edge does)."""
    features = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return F.cross_entropy(model.get_output_embeddings()(features[mask]).float(), targets[mask])


def child_full(args) -> None:
    """The reference: LoRA on every block of the full model, same data, batches, steps and settings."""
    from peft import LoraConfig, inject_adapter_in_model

    model_dir = resolve_model(MODEL)
    model = load_causal_lm(model_dir).requires_grad_(False)
    tok = load_tokenizer(model_dir)
    cfg = train_config(args)
    spec = arch_for(model.config)
    torch.manual_seed(cfg.seed)
    model = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=list(
        cfg.lora.resolved_targets(spec)), bias="none"), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    data = load_train(cfg.data, tok, cfg.seq_len)
    model.train()

    def step(_s, ids, labels):
        loss = full_loss(model, ids, labels)
        loss.backward()
        return loss.item()

    out = timed_loop(step, params, train_batches(data, cfg.batch_size, tok.pad_token_id, cfg.seed), cfg)
    out["peak_rss_mb"] = peak_rss_mb()
    out["trainable_params"] = sum(p.numel() for p in params)
    if args.speed_out is not None:  # --phase speed: no evaluation
        args.speed_out.write_text(json.dumps(out))
        return
    model.eval()
    full = split_causal_lm(model, args.edge_layers)
    eval_data = load_eval(eval_subset(args), tok, cfg.seq_len)
    out["accuracy"] = evaluate(full.edge, LocalMiddle(full.middle), eval_data, tok.pad_token_id, 32, Traffic())
    record("full_lora", out)


def phase_plug_in(args) -> None:
    model_dir = resolve_model(MODEL)
    model = load_causal_lm(model_dir).requires_grad_(False)
    tok = load_tokenizer(model_dir)
    split = split_causal_lm(model, args.edge_layers)
    tuned = apply_to_edge(split.edge, Path(results()["offsite"]["adapter_dir"]), arch_for(model.config)).eval()
    data = load_eval(eval_subset(args), tok, args.seq_len)
    record("plug_in", {"accuracy": evaluate(tuned, LocalMiddle(split.middle), data, tok.pad_token_id, 32,
                                            Traffic())})


def child(args, phase: str, extra: list[str] | None = None) -> None:
    """A phase in its own process, so its peak RSS is its own."""
    argv = sys.argv[1:]
    at = argv.index("--phase")
    subprocess.run([sys.executable, __file__, *argv[:at], *argv[at + 2:], "--phase", phase, *(extra or [])],
                   check=True, cwd=REPO)


def phase_all(args) -> None:
    """Every phase, in one invocation: the side-by-side numbers of docs/offsite_benchmark.md."""
    if not (args.data / "eval.jsonl").is_file():
        sys.path.insert(0, str(REPO / "deploy"))
        from prepare_rotten_tomatoes import prepare

        prepare(args.data.parent, clients=1, train_rows=2000, eval_rows=1000, seed=0)
    if emulators(args)["distilled"] is None:
        raise SystemExit(f"no distilled emulator (K={args.edge_layers}, E={args.emulator_layers}) in {args.store}; "
                         "build one first (see this script's docstring)")
    OUT_JSON.write_text("{}")
    start = time.perf_counter()
    phase_zero_shot(args)
    child(args, "_train-offsite")
    phase_plug_in(args)
    child(args, "_train-full")
    record("run", {"command": "python tests/benchmarks/bench_offsite.py " + " ".join(sys.argv[1:]),
                   "threads": args.threads, "wall_s": time.perf_counter() - start})


# --phase speed: (name, child phase, extra flags); every setting runs twice, in this order and then reversed
SPEED_RUNS = [("offsite, --tune lora, fp32 emulator", "_speed-offsite", ["--tune", "lora"]),
              ("offsite, --tune lora-top, fp32 emulator", "_speed-offsite", ["--tune", "lora-top"]),
              ("offsite, --tune lora-top, bf16 emulator", "_speed-offsite",
               ["--tune", "lora-top", "--emulator-dtype", "bfloat16"]),
              ("full-model LoRA (reference)", "_speed-full", [])]


def default_bundle(args) -> Path:
    """The offsite bundle of the default emulator (``serve``'s and the demo's), built into --store if missing."""
    from cloud.store.emulators import default_spec

    model_dir = resolve_model(MODEL)
    model = load_causal_lm(model_dir).requires_grad_(False)
    plan = plan_for(model.config, args.edge_layers)
    spec = default_spec(args.edge_layers, len(plan.middle), args.emulator_layers)  # as serve picks it
    stored = EmulatorStore(args.store).build(model, MODEL, model_fingerprint(model_dir), spec,
                                             load_tokenizer(model_dir))
    return write_bundle(model, model_dir, plan, args.store / "bundles", MODEL, stored.load(model),
                        stored.public_meta())


def speed_offsite(args) -> None:
    """One offsite training run of --phase speed: only the bundle in memory, the product's trainable set."""
    from edge.modes.offsite import trainable

    kit = load_kit(args.bundle, getattr(torch, args.emulator_dtype))
    cfg = dataclasses.replace(train_config(args), tune=args.tune)
    data = load_train(cfg.data, kit.tokenizer, cfg.seq_len)
    model, params = trainable(kit.edge, kit.spec, cfg)
    link = kit.link()
    model.train()
    out = timed_loop(lambda s, i, lab: split_step(model, link, s, i, lab, Traffic()).loss, params,
                     train_batches(data, cfg.batch_size, kit.pad_id, cfg.seed), cfg)
    out["peak_rss_mb"] = peak_rss_mb()
    out["trainable_params"] = sum(p.numel() for p in params)
    args.speed_out.write_text(json.dumps(out))


def phase_speed(args) -> None:
    """Edge tokens/s, FLOPs/step and peak RSS of offsite training (default emulator) vs full-model LoRA."""
    if not (args.data / "train.jsonl").is_file():
        sys.path.insert(0, str(REPO / "deploy"))
        from prepare_rotten_tomatoes import prepare

        prepare(args.data.parent, clients=1, train_rows=2000, eval_rows=1000, seed=0)
    bundle = default_bundle(args)  # built (once) before any timed child starts
    start, runs = time.perf_counter(), {name: [] for name, _, _ in SPEED_RUNS}
    for order in (SPEED_RUNS, SPEED_RUNS[::-1]):
        for name, phase, extra in order:
            got = args.work / "speed-run.json"
            got.unlink(missing_ok=True)
            child(args, phase, [*extra, "--bundle", str(bundle), "--speed-out", str(got)])
            runs[name].append(json.loads(got.read_text()))
    blocks = read_plan(bundle)[1].get("emulator", {}).get("blocks")
    record("speed", {"runs": runs, "emulator": blocks, "steps": args.steps, "threads": args.threads,
                     "batch": f"{args.batch_size} x <= {args.seq_len} tokens",
                     "command": "python tests/benchmarks/bench_offsite.py " + " ".join(sys.argv[1:]),
                     "wall_s": time.perf_counter() - start})


def render_speed(sp: dict) -> list[str]:
    """The --phase speed table: each setting's two runs, and the ratios to full-model LoRA (run-wise mean)."""
    full = sp["runs"]["full-model LoRA (reference)"]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    lines = ["## Edge training speed and memory (`--phase speed`)", "",
             f"`{sp['command']}`: {sp['steps']} steps of batch {sp['batch']} ({sp['threads']} threads, the first 3 "
             f"steps not timed), each setting in its own process, twice (in order, then in reverse order); "
             f"default emulator (blocks {sp.get('emulator')}). Ratios are of the two runs' means.", "",
             "| edge training | tokens/s (run 1 / run 2) | vs full-model LoRA | peak RSS MiB (run 1 / run 2) "
             "| vs full-model LoRA | GFLOPs/step | trainable params |", "|---|---|---|---|---|---|---|"]
    for name, rows in sp["runs"].items():
        tps = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rows)
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
        lines.append(f"| {name} | {tps} | {mean(rows, 'tokens_per_s') / mean(full, 'tokens_per_s'):.2f}x | {rss} | "
                     f"{mean(rows, 'peak_rss_mb') / mean(full, 'peak_rss_mb'):.2f}x | "
                     f"{mean(rows, 'flops_per_step') / 1e9:.0f} | {rows[0].get('trainable_params', 0):,} |")
    return lines


def phase_matrix(args) -> None:
    """The emulator matrix (see tests/benchmarks/offsite_matrix.py): resumable units under --work/units."""
    from tests.benchmarks.offsite_matrix import Matrix, default_emulators, run, summary

    if not (args.data / "eval.jsonl").is_file():
        sys.path.insert(0, str(REPO / "deploy"))
        from prepare_rotten_tomatoes import prepare

        prepare(args.data.parent, clients=1, train_rows=2000, eval_rows=1000, seed=0)
    m = Matrix(eval_subset(args), args.data / "train.jsonl", args.work, args.store, args.steps,
               emulators=default_emulators())
    start = time.perf_counter()
    if args.units != "report":
        run(m, args.units)
    old = results()
    earlier = old.get("earlier_run") or {k: v for k, v in old.items() if not k.startswith("matrix")}
    data = {k: v for k, v in old.items() if k.startswith("matrix") or k == "speed"}
    data["matrix"] = summary(m)
    data["earlier_run"] = earlier  # the single-emulator --phase all run: speed, memory and bytes
    # the commands behind this table: the workers that ran on this --work (a table from another --work,
    # e.g. with another --eval-rows, is replaced, not merged)
    runs = {k: v for k, v in data.get("matrix_runs", {}).items() if v.get("work") == str(args.work)}
    data["matrix_runs"] = runs
    if args.units != "report":  # a worker records its command when it ends
        runs[args.units] = {"command": "python tests/benchmarks/bench_offsite.py " + " ".join(sys.argv[1:]),
                            "threads": args.threads, "wall_s": time.perf_counter() - start, "work": str(args.work)}
    OUT_JSON.write_text(json.dumps(data, indent=2))
    OUT_MD.write_text(render(data))


def render(d: dict) -> str:
    if "matrix" in d:
        from tests.benchmarks.offsite_matrix import render as render_matrix

        runs = d.get("matrix_runs", {})
        command = "; ".join(r["command"] for r in runs.values()) or "tests/benchmarks/bench_offsite.py --phase matrix"
        threads = next(iter(runs.values()), {}).get("threads", "?")
        earlier = render(d["earlier_run"]).split("\n", 1)[1] if d.get("earlier_run") else ""
        speed = [*render_speed(d["speed"]), ""] if d.get("speed") else []
        return "\n".join(["# Offsite-Tuning emulator benchmark (SmolLM2-135M, Rotten Tomatoes)", "",
                          *render_matrix(d["matrix"], command, threads), "", *speed,
                          "## Earlier single-emulator run (`--phase all`; edge speed, memory and bytes, not rerun)",
                          earlier])
    z, o, p, f = (d.get(k, {}) for k in ("zero_shot", "offsite", "plug_in", "full_lora"))

    def acc(v):
        return f"{v:.3f}" if isinstance(v, float) else "—"

    rows = [("Majority class (always the more frequent label)", acc(z.get("majority_class"))),
            ("Full model, zero-shot", acc(z.get("full_zero_shot"))),
            (f"Emulator (layer drop, blocks {z.get('emulator_blocks', '?')}), zero-shot",
             acc(z.get("layer_drop_zero_shot"))),
            ("Emulator (distilled), zero-shot", acc(z.get("distilled_zero_shot"))),
            ("Emulator (distilled) + offsite adapter", acc(o.get("emulator_adapter"))),
            ("Plug-in: full model + offsite adapter", acc(p.get("accuracy"))),
            ("Full-model LoRA, same data and steps (reference)", acc(f.get("accuracy")))]
    run = d.get("run", {})
    lines = [f"# Offsite-Tuning benchmark (SmolLM2-135M, Rotten Tomatoes, {run.get('threads', '?')} CPU threads)", "",
             f"Generated in one run by `{run.get('command', 'tests/benchmarks/bench_offsite.py')}` "
             f"({run.get('wall_s', 0) / 60:.0f} min); {z.get('eval_rows', '?')} paired eval rows; "
             f"K={z.get('edge_layers', '?')} adapter blocks at each end, E={z.get('emulator_layers', '?')} emulator "
             f"blocks; {o.get('steps', '?')} steps of batch 8 x <= 64 tokens, LoRA r=8 on all projections.", "",
             "| model | accuracy |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], ""]
    if o and f:
        flop_ratio = f["flops_per_step"] / o["flops_per_step"]
        lines += ["| edge training | offsite (emulator) | full-model LoRA | ratio |", "|---|---|---|---|",
                  f"| tokens/s | {o['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} | "
                  f"{o['tokens_per_s'] / f['tokens_per_s']:.2f}x |",
                  f"| FLOPs/step | {o['flops_per_step'] / 1e9:.1f} G | {f['flops_per_step'] / 1e9:.1f} G | "
                  f"{flop_ratio:.2f}x fewer (speed-up limit) |",
                  f"| peak RSS | {o['peak_rss_mb']:.0f} MiB | {f['peak_rss_mb']:.0f} MiB | "
                  f"{o['peak_rss_mb'] / f['peak_rss_mb']:.2f}x |", ""]
    if o and z.get("offsite_bundle_bytes"):
        lines += ["| bytes moved | offsite | split mode (same batches) |", "|---|---|---|",
                  f"| set-up download | {z['offsite_bundle_bytes'] / 2**20:.1f} MiB (bundle with emulator) | "
                  f"{z['split_bundle_bytes'] / 2**20:.1f} MiB (bundle) |",
                  f"| training | 0 | {o['split_payload_bytes'] / 2**20:.0f} MiB payload |",
                  f"| upload | {o['adapter_bytes'] / 2**20:.2f} MiB (adapter) | "
                  f"{o['adapter_bytes'] / 2**20:.2f} MiB (adapter) |", ""]
    if z.get("distill"):
        dd = z["distill"]
        lines += [f"Distillation ({dd['distill_data']}, {dd['distill']['steps']} steps, lr {dd['distill']['lr']}, "
                  f"batch {dd['distill']['batch_size']} x {dd['distill']['seq_len']}): held-out KD loss "
                  f"{dd['kd_before']['total']:.3f} -> {dd['kd_after']['total']:.3f} "
                  f"(CE {dd['kd_before']['ce']:.3f} -> {dd['kd_after']['ce']:.3f}, hidden "
                  f"{dd['kd_before']['hidden']:.3f} -> {dd['kd_after']['hidden']:.3f}).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)  # also the stand-in identity directory of TrainConfig
    torch.set_num_threads(args.threads)
    phases = {"matrix": phase_matrix, "all": phase_all, "zero-shot": phase_zero_shot, "plug-in": phase_plug_in,
              "offsite": lambda a: child(a, "_train-offsite"), "_train-offsite": child_offsite,
              "full-lora": lambda a: child(a, "_train-full"), "_train-full": child_full, "speed": phase_speed,
              "_speed-offsite": speed_offsite, "_speed-full": child_full,
              "report": lambda a: OUT_MD.write_text(render(results()))}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
