"""Benchmark (not a test): split vs dlora vs dlora + Kill-and-Revive vs + int8, over real mutual TLS.

SmolLM2-135M, one client's Rotten Tomatoes partition, the same steps, seed and settings for every
run, side by side in one invocation: a coordinator process on loopback, the edge recipe
(:func:`edge.training.recipes.train`) in this process. Writes ``docs/dlora_benchmark.json`` and
``docs/dlora_benchmark.md`` (after every run, so a partial result survives) and reports the goals
of issue 4 (KR: >= 80 % fewer edge LoRA FLOPs and >= 85 % fewer bytes than all-active, accuracy
within 1 point; int8: 4x fewer bytes than fp32, accuracy within 0.5 point).

Usage (repo root): ``python tests/benchmarks/bench_dlora.py --steps 100 --eval-rows 400``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))

from prepare_rotten_tomatoes import prepare  # noqa: E402

from edge.modes.kill_revive import KillReviveConfig  # noqa: E402
from edge.training.recipes import TrainConfig, train  # noqa: E402
from emulator.adapters.lora import LoraSettings  # noqa: E402
from protocol.pki import init_pki, issue_client  # noqa: E402
from tests.conftest import start_cloud, stop_cloud  # noqa: E402


@dataclass(frozen=True)
class Run:
    name: str
    mode: str
    wire: str
    kr: bool  # Kill-and-Revive with --kr-budget, --kr-warmup, --probe-every
    score: str = "grad"  # Kill-and-Revive importance (--kr-score)


RUNS = [Run("split", "split", "fp32", False), Run("dlora all-active", "dlora", "fp32", False),
        Run("dlora + KR", "dlora", "fp32", True), Run("dlora + KR + int8", "dlora", "int8", True),
        Run("dlora + KR (taylor score)", "dlora", "fp32", True, "taylor")]


def summarize(run: Run, m: dict, kr: KillReviveConfig) -> dict:
    steps = m["steps"]
    return {"run": run.name, "mode": run.mode, "wire_dtype": run.wire, "kr_budget": kr.budget, "kr_score": kr.score,
            "eval_accuracy_after": m["eval_accuracy_after"], "eval_rows": m["eval_rows"],
            "edge_flops": m["edge_flops"], "edge_lora_flops": m["lora_flops"],
            "bytes_sent": m["bytes_sent"], "bytes_received": m["bytes_received"],
            "exchanges": m["round_trips"], "site_exchanges": m["site_exchanges"],
            "active_modules_mean": m["active_modules_mean"], "lora_modules": m["lora_modules"],
            "wall_s_per_step": m["train_wall_s"] / steps, "cloud_compute_s_per_step": m["cloud_compute_s"] / steps,
            "loss_first": m["loss_first"], "loss_last": m["loss_last"], "kr_events": len(m["kr_events"])}


def goals(rows: dict[str, dict], zero_shot: float | None) -> list[str]:
    out = []
    base, kr, q = rows.get("dlora all-active"), rows.get("dlora + KR"), rows.get("dlora + KR + int8")
    for name, row in ((n, rows.get(n)) for n in ("dlora + KR", "dlora + KR (taylor score)")):
        if not (base and row):
            continue
        who = "KR" if name == "dlora + KR" else "KR (taylor score)"
        flops = 1 - row["edge_lora_flops"] / base["edge_lora_flops"]
        traffic = 1 - _bytes(row) / _bytes(base)
        acc = (row["eval_accuracy_after"] - base["eval_accuracy_after"]) * 100
        out += [f"{who} vs all-active: edge LoRA FLOPs -{flops:.1%} (goal >= 80%: "
                f"{'met' if flops >= 0.8 else 'NOT met'})",
                f"{who} vs all-active: bytes -{traffic:.1%} (goal >= 85%: {'met' if traffic >= 0.85 else 'NOT met'})",
                f"{who} vs all-active: accuracy {acc:+.1f} points (goal within 1: "
                f"{'met' if acc >= -1 else 'NOT met'})"]
    if kr and q:
        ratio = _bytes(kr) / _bytes(q)
        acc = (q["eval_accuracy_after"] - kr["eval_accuracy_after"]) * 100
        out += [f"int8 vs fp32 (both KR): bytes {ratio:.2f}x fewer (goal 4x: {'met' if ratio >= 4 else 'NOT met'})",
                f"int8 vs fp32 (both KR): accuracy {acc:+.1f} points (goal within 0.5: "
                f"{'met' if acc >= -0.5 else 'NOT met'})"]
    if zero_shot is not None:
        out.append(f"zero-shot accuracy (B = 0, identical for every run): {zero_shot:.4f}")
    return out


def _bytes(row: dict) -> int:
    return row["bytes_sent"] + row["bytes_received"]


def write_report(rows: dict[str, dict], meta: dict, docs: Path) -> None:
    zero_shot = meta.get("zero_shot")
    report = {"meta": meta, "runs": list(rows.values()), "goals": goals(rows, zero_shot)}
    (docs / "dlora_benchmark.json").write_text(json.dumps(report, indent=2))
    n = meta["eval_rows"]
    half = 1.96 * math.sqrt(0.25 / n) if n else 0
    lines = ["# dlora benchmark (SmolLM2-135M, Rotten Tomatoes, loopback mutual TLS)", "",
             f"Command: `{meta['command']}`. {meta['steps']} steps per run, batch {meta['batch_size']}, "
             f"<= {meta['seq_len']} tokens, LoRA r={meta['rank']} on {meta['targets']}, lr {meta['lr']}, "
             f"warmup {meta['warmup']}, clip 1, seed 0; KR (gradient-norm score unless the run says "
             f"taylor) budget {meta['kr_budget']}, KR warm-up "
             f"{meta['kr_warmup']} steps, probe every {meta['probe_every']}; the cloud's middle runs in "
             f"{meta['backbone_dtype']}. Eval: {n} rows (95% interval about +-{half * 100:.1f} points), every run "
             f"on the same rows. {meta['threads']} torch threads each for edge and cloud (sharing the machine's "
             "cores); wall time is per training step.", "",
             "| run | wire | accuracy | edge FLOPs | edge LoRA FLOPs | MB up | MB down | exchanges | "
             "active modules (mean) | s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['run']} | {r['wire_dtype']} | {r['eval_accuracy_after']:.4f} | {r['edge_flops']:.3e} | "
                     f"{r['edge_lora_flops']:.3e} | {r['bytes_sent'] / 1e6:.1f} | {r['bytes_received'] / 1e6:.1f} | "
                     f"{r['exchanges']} | {r['active_modules_mean']:.1f} / {r['lora_modules']} | "
                     f"{r['wall_s_per_step']:.2f} |")
    lines += ["", "## Goals (issue 4)", ""] + [f"- {g}" for g in report["goals"]]
    (docs / "dlora_benchmark.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--kr-budget", type=float, default=0.1)
    parser.add_argument("--kr-warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", nargs="*", default=[r.name for r in RUNS])
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-dlora-"))
    prepare(work / "data", clients=1, train_rows=args.train_rows, eval_rows=args.eval_rows, seed=0)
    pki = work / "pki"
    init_pki(pki, ["localhost", "127.0.0.1"])
    issue_client(pki, "bench")
    cloud = start_cloud("smollm2-135m", pki, work / "store", timeout=600,
                        extra=["--threads", str(args.threads), "--backbone-dtype", args.backbone_dtype])
    meta = {"command": "python tests/benchmarks/bench_dlora.py " + " ".join(sys.argv[1:]), "steps": args.steps,
            "batch_size": 8, "seq_len": 64, "rank": 8, "targets": "q_proj,v_proj (every block)", "lr": args.lr,
            "warmup": 8, "probe_every": args.probe_every, "eval_rows": args.eval_rows, "kr_budget": args.kr_budget,
            "kr_warmup": args.kr_warmup, "threads": args.threads, "backbone_dtype": args.backbone_dtype}
    rows: dict[str, dict] = {}
    try:
        for i, run in enumerate(r for r in RUNS if r.name in args.runs):
            kr = KillReviveConfig(args.kr_budget, args.probe_every, warmup=args.kr_warmup, score=run.score) \
                if run.kr else KillReviveConfig()
            cfg = TrainConfig(cloud=cloud.address, identity=pki / "clients" / "bench",
                              data=work / "data" / "client0" / "train.jsonl",
                              eval=work / "data" / "client0" / "eval.jsonl", out=work / "runs" / str(i),
                              mode=run.mode, steps=args.steps, lr=args.lr, warmup_steps=8,
                              schedule="constant_with_warmup", lora=LoraSettings(), wire_dtype=run.wire,
                              threads=args.threads, eval_before=i == 0, kr=kr)
            start = time.perf_counter()
            m = train(cfg).as_dict()
            if i == 0:
                meta["zero_shot"] = m["eval_accuracy_before"]
            rows[run.name] = {**summarize(run, m, kr), "run_wall_s": time.perf_counter() - start}
            print(json.dumps(rows[run.name]), flush=True)
            write_report(rows, meta, args.docs)
    finally:
        stop_cloud(cloud)
    print("\n".join(goals(rows, meta.get("zero_shot"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
