"""Benchmark: one split step over loopback mutual TLS against the same LoRA step in-process.

Runs on the real SmolLM2-135M. Four variants take turns step by step (so machine drift hits all
of them alike): the whole model with PEFT LoRA in one process, the same split segments with the
middle in-process (fp32, and bf16 as ``serve --backbone-dtype bfloat16`` runs it), and the split
step against a real ``edgetune-cloud serve`` over mTLS. Also measures how far one bf16-middle step's
loss and LoRA gradients are from the fp32 step's on the same weights and batch. Writes JSON and a
Markdown table.

    python tests/benchmarks/bench_split.py --threads 2 --steps 8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from edge.modes.split import LocalMiddle, RemoteMiddle, split_step  # noqa: E402
from edge.rpc.client import CloudClient  # noqa: E402
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters, peft_config  # noqa: E402
from emulator.data.datasets import IGNORE  # noqa: E402
from emulator.model.bundle import load_edge_model  # noqa: E402
from emulator.model.loading import load_causal_lm, resolve_model  # noqa: E402
from emulator.model.segments import extract_middle, plan_for  # noqa: E402
from protocol.accounting import Traffic  # noqa: E402
from protocol.channel import secure_channel  # noqa: E402
from protocol.pki import init_pki, issue_client  # noqa: E402
from tests.conftest import start_cloud, stop_cloud  # noqa: E402


def batch(b: int, s: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (b, s), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -1] = ids[:, -1]  # one labelled token per row, like the classification task
    return ids, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--edge-layers", type=int, default=2)
    ap.add_argument("--lora-targets", default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench_split.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the cloud process must not spin while the edge works

    model_dir = resolve_model(args.model)
    full = load_causal_lm(model_dir)
    plan = plan_for(full.config, args.edge_layers)
    settings = LoraSettings(rank=8, alpha=16, targets=tuple(t for t in args.lora_targets.split(",") if t))
    work = Path(tempfile.mkdtemp(prefix="bench-split-"))
    init_pki(work / "pki", ["127.0.0.1"])
    issue_client(work / "pki", "bench")
    cloud = start_cloud(args.model, work / "pki", work / "store",
                        extra=["--threads", str(args.threads), "--edge-layers", str(args.edge_layers)],
                        env={"OMP_WAIT_POLICY": "PASSIVE"})
    try:
        result = run(args, full, plan, settings, cloud.address, work / "pki" / "clients" / "bench")
    finally:
        stop_cloud(cloud)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def run(args, full, plan, settings, address, identity) -> dict:
    with secure_channel(address, identity) as channel:
        client = CloudClient(channel)
        info = client.open_session("split", args.edge_layers)
        edge = load_edge_model(client.bundle(info))
        spec = edge.bottom.spec
        remote_model = add_lora(edge, settings, spec)
        local_model = add_lora(edge, settings, spec)
        reference = get_peft_model(full, peft_config(remote_model, settings, spec, args.model))
        local = LocalMiddle(extract_middle(full, plan))
        bf16_model = copy.deepcopy(local_model)
        local_bf16 = LocalMiddle(extract_middle(full, plan).to(torch.bfloat16))
        bf16_error = bf16_step_error(local_model, local, bf16_model, local_bf16, args, full.config.vocab_size)
        stream = client.train_stream(info)
        remote = RemoteMiddle(stream)
        variants = {
            "in_process_peft": (lambda ids, lab, tr: reference(input_ids=ids, labels=lab).loss.backward(),
                                [p for n, p in reference.named_parameters() if p.requires_grad]),
            "split_in_process": (lambda ids, lab, tr: split_step(local_model, local, 1, ids, lab, tr),
                                 list(lora_parameters(local_model).values())),
            "split_in_process_bf16_middle": (lambda ids, lab, tr: split_step(bf16_model, local_bf16, 1, ids, lab, tr),
                                             list(lora_parameters(bf16_model).values())),
            "split_grpc_mtls": (lambda ids, lab, tr: split_step(remote_model, remote, 1, ids, lab, tr),
                                list(lora_parameters(remote_model).values())),
        }
        optimizers = {k: torch.optim.AdamW(p, lr=1e-4) for k, (_, p) in variants.items()}
        times: dict[str, list[float]] = {k: [] for k in variants}
        traffic = Traffic()
        for i in range(args.warmup + args.steps):
            ids, labels = batch(args.batch_size, args.seq_len, full.config.vocab_size, i)
            for name, (step, _) in variants.items():
                tr = traffic if name == "split_grpc_mtls" and i >= args.warmup else Traffic()
                start = time.perf_counter()
                step(ids, labels, tr)
                optimizers[name].step()
                optimizers[name].zero_grad()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        stream.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    b, s, h = args.batch_size, args.seq_len, full.config.hidden_size
    return {
        "model": args.model, "threads": args.threads, "batch_size": b, "seq_len": s, "edge_layers": args.edge_layers,
        "lora_targets": args.lora_targets, "steps_timed": args.steps,
        "median_step_s": med, "min_step_s": {k: min(v) for k, v in times.items()},
        "max_step_s": {k: max(v) for k, v in times.items()},
        "ratio_split_grpc_vs_in_process": med["split_grpc_mtls"] / med["in_process_peft"],
        "ratio_split_grpc_vs_split_in_process": med["split_grpc_mtls"] / med["split_in_process"],
        "bytes_per_step_sent": traffic.bytes_sent / args.steps,
        "bytes_per_step_received": traffic.bytes_received / args.steps,
        "payload_bytes_per_step": (traffic.payload_bytes_sent + traffic.payload_bytes_received) / args.steps,
        "payload_formula_bytes": 4 * b * s * h * 4,
        "round_trips_per_step": traffic.round_trips / args.steps,
        "ratio_bf16_middle_vs_fp32_middle": med["split_in_process_bf16_middle"] / med["split_in_process"],
        "bf16_middle_error": bf16_error,
    }


def bf16_step_error(model, link, bf16_model, bf16_link, args, vocab: int) -> dict:
    """One step of each on the same weights and batch: relative loss and LoRA-gradient differences."""
    ids, labels = batch(args.batch_size, args.seq_len, vocab, 10_000)
    exact = split_step(model, link, 1, ids, labels, Traffic()).loss
    approx = split_step(bf16_model, bf16_link, 1, ids, labels, Traffic()).loss
    grads = [torch.cat([p.grad.flatten() for p in lora_parameters(m).values() if p.grad is not None])
             for m in (model, bf16_model)]
    model.zero_grad(set_to_none=True)
    bf16_model.zero_grad(set_to_none=True)
    return {"loss_fp32": exact, "loss_bf16": approx, "loss_rel_diff": abs(approx - exact) / abs(exact),
            "grad_rel_diff": float((grads[1] - grads[0]).norm() / grads[0].norm())}


def markdown(r: dict) -> str:
    rows = [f"| {k} | {r['median_step_s'][k]:.3f} | {r['min_step_s'][k]:.3f} | {r['max_step_s'][k]:.3f} |"
            for k in r["median_step_s"]]
    return "\n".join([
        f"# Split step vs in-process LoRA step ({r['model']}, batch {r['batch_size']} x {r['seq_len']} tokens, "
        f"K={r['edge_layers']}, LoRA targets {r['lora_targets']}, {r['threads']} torch threads)", "",
        "| variant | median s/step | min | max |", "|---|---|---|---|", *rows, "",
        f"- split over mTLS / in-process PEFT: **{r['ratio_split_grpc_vs_in_process']:.2f}x**",
        f"- split over mTLS / split in-process: **{r['ratio_split_grpc_vs_split_in_process']:.2f}x**",
        f"- bytes per step: {r['bytes_per_step_sent']:.0f} sent, {r['bytes_per_step_received']:.0f} received "
        f"(payload {r['payload_bytes_per_step']:.0f}; formula 4 x B x S x H x 4 = {r['payload_formula_bytes']}); "
        f"{r['round_trips_per_step']:.0f} round trips per step",
        f"- middle in bf16 (`serve --backbone-dtype bfloat16`) / fp32, in-process: "
        f"**{r['ratio_bf16_middle_vs_fp32_middle']:.2f}x** the step time; on one batch and the same weights "
        f"its loss differs by {r['bf16_middle_error']['loss_rel_diff']:.2%} and its LoRA gradients by "
        f"{r['bf16_middle_error']['grad_rel_diff']:.2%} (relative norm) from the fp32 step's", "",
        "Produced by `python tests/benchmarks/bench_split.py` (see the script for flags).", ""])


if __name__ == "__main__":
    sys.exit(main())
