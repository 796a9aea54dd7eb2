"""Benchmark: the edge's inference on torch vs onnxruntime fp32 vs onnxruntime int8, on SmolLM2-135M.

One invocation: prepares Rotten Tomatoes rows, trains a split LoRA in-process for a short run (or takes
``--adapter``), exports it (fp32 and ``--quantize int8``), starts a real ``edgetune-cloud serve`` for
the middle, then runs each runtime's edge in its own subprocess against that cloud over loopback
mutual TLS, one after the other on the same rows in the same batches. The onnxruntime workers run with
torch, transformers and peft blocked from import. The torch edge runs the same merged weights (the
best torch can do; ``eval`` today adds unmerged LoRA on top).

Edge-side time is each worker's batch loop minus the time it waits for the middle (network and cloud
compute), so tokens/s measures the edge alone; tokens are the positions the bottom segment processes
(right padding included, identical across runtimes). Peak RSS is the worker's ``VmHWM``. Install size
is the sum of the files each installed distribution lists in its RECORD, over the dependency closure of
the full install and of the ``edge-runtime`` extra, in this virtualenv.

    python tests/benchmarks/bench_edge_runtime.py --rows 1000 --train-steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RUNTIMES = ("torch", "onnx-fp32", "onnx-int8")
BLOCK_TORCH = """
import runpy, sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'peft', 'safetensors', 'accelerate'):
            raise ImportError(f'{name} is blocked: the onnx worker must run without torch')
sys.meta_path.insert(0, Blocked())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batches(lengths: list[int], batch: int) -> list[list[int]]:
    """Row indices in length order, cut into batches (as the scoring loops order them)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch] for i in range(0, len(order), batch)]


class TimedMiddle:
    """Wraps a middle call and adds up the seconds the edge waits for it."""

    def __init__(self, call):
        self.call, self.seconds = call, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.call(*args)
        finally:
            self.seconds += time.perf_counter() - start


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from edge.modes.split import RemoteMiddle, score_examples
    from edge.rpc.client import CloudClient
    from edge.runtime.export import merged_edge
    from emulator.data.datasets import load_eval, pad_batch
    from emulator.model.bundle import load_edge_model, read_plan
    from emulator.model.loading import load_tokenizer
    from protocol.accounting import Traffic
    from protocol.channel import secure_channel

    start = time.perf_counter()
    model, _ = merged_edge(load_edge_model(args.bundle), args.adapter, read_plan(args.bundle)[0])
    tok = load_tokenizer(args.bundle)
    examples = load_eval(args.data, tok, 64).examples
    load_s = time.perf_counter() - start
    preds: dict[int, int] = {}
    tokens = 0
    with secure_channel(args.cloud, args.identity) as channel, torch.no_grad():
        client = CloudClient(channel)
        link = RemoteMiddle(client.train_stream(client.open_session("split", 2)))
        link.forward = TimedMiddle(link.forward)  # type: ignore[method-assign]
        loop = time.perf_counter()
        for chunk in batches([len(e.sequences[0]) for e in examples], args.batch):
            rows = [examples[i] for i in chunk]
            tokens += pad_batch([s for r in rows for s in r.sequences], tok.pad_token_id).numel()
            preds.update(zip(chunk, score_examples(model, link, rows, tok.pad_token_id, Traffic())))
        loop_s = time.perf_counter() - loop
        link.stream.close()
    return {"predictions": [preds[i] for i in range(len(examples))], "answers": [e.answer for e in examples],
            "edge_s": loop_s - link.forward.seconds, "middle_s": link.forward.seconds, "tokens": tokens,
            "load_s": load_s, "peak_rss_mb": peak_rss_mb()}


def worker_onnx(args) -> dict:
    from tokenizers import Tokenizer

    from edge.runtime.inputs import load_rows
    from edge.runtime.manifest import read_manifest
    from edge.runtime.onnx_runner import OnnxEdge, choose, pad
    from edge.runtime.remote import ArrayMiddle, open_split_session
    from protocol.accounting import Traffic
    from protocol.channel import secure_channel

    start = time.perf_counter()
    manifest = read_manifest(args.model)
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    rows = load_rows(args.data, tok, 64)
    edge = OnnxEdge(args.model, args.threads)
    pad_id = manifest["tokenizer"]["pad_id"]
    load_s = time.perf_counter() - start
    preds: dict[int, int] = {}
    tokens = 0
    with secure_channel(args.cloud, args.identity) as channel:
        traffic = Traffic()
        info = open_split_session(channel, manifest["base_model"]["edge_layers"], traffic)
        remote = ArrayMiddle(channel, info.session_id, traffic)
        middle = TimedMiddle(remote)
        loop = time.perf_counter()
        for chunk in batches([len(r.sequences[0]) for r in rows], args.batch):
            batch_rows = [rows[i] for i in chunk]
            tokens += pad([s for r in batch_rows for s in r.sequences], pad_id).size
            preds.update(zip(chunk, [c for c, _ in choose(edge, middle, batch_rows, pad_id)]))
        loop_s = time.perf_counter() - loop
        remote.close()
    return {"predictions": [preds[i] for i in range(len(rows))], "answers": [r.answer for r in rows],
            "edge_s": loop_s - middle.seconds, "middle_s": middle.seconds, "tokens": tokens, "load_s": load_s,
            "torch_imported": "torch" in sys.modules, "peak_rss_mb": peak_rss_mb()}


def train_adapter(model_dir: Path, train_file: Path, out: Path, steps: int, threads: int) -> dict:
    """A short split LoRA run in-process (all linear targets of K=2, r=8): the adapter the edge exports."""
    import torch

    from edge.modes.split import LocalMiddle, split_step
    from emulator.adapters.lora import LoraSettings, adapter_state_dict, add_lora, peft_config, save_adapter
    from emulator.data.datasets import load_train, train_batches
    from emulator.model.loading import load_causal_lm, load_tokenizer
    from emulator.model.segments import split_causal_lm
    from protocol.accounting import Traffic

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    split = split_causal_lm(load_causal_lm(model_dir), 2)
    settings = LoraSettings(8, 16, 0.0, ("all",))
    spec = split.edge.bottom.spec
    model = add_lora(split.edge, settings, spec)
    tok = load_tokenizer(model_dir)
    data = load_train(train_file, tok, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    link, losses, start = LocalMiddle(split.middle), [], time.perf_counter()
    for step, (ids, labels) in zip(range(steps), train_batches(data, 8, tok.pad_token_id, 0)):
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * min(1.0, (step + 1) / 10)
        losses.append(split_step(model, link, step, ids, labels, Traffic()).loss)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(out, adapter_state_dict(model, spec), peft_config(model, settings, spec, "smollm2-135m"))
    return {"steps": steps, "lr": 5e-4, "batch": 8, "first_loss": losses[0], "last10_loss": sum(losses[-10:]) / 10,
            "train_s": time.perf_counter() - start}


def install_sizes() -> dict:
    """Bytes on disk of the dependency closure of the full install and of the edge-runtime extra."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def closure(requirements: list[str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        todo = [Requirement(r) for r in requirements]
        while todo:
            req = todo.pop()
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = req.name.lower().replace("_", "-")
            if name in seen:
                continue
            try:
                dist = metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue
            seen[name] = sum((f.size or 0) for f in (dist.files or []))
            todo += [Requirement(r) for r in (dist.requires or [])]
        return seen

    full = closure(project["dependencies"])
    edge = closure(project["optional-dependencies"]["edge-runtime"])
    top = sorted(full.items(), key=lambda kv: -kv[1])[:5]
    return {"full_mb": sum(full.values()) / 2**20, "edge_runtime_mb": sum(edge.values()) / 2**20,
            "full_packages": len(full), "edge_runtime_packages": sorted(edge),
            "largest_in_full": {k: round(v / 2**20, 1) for k, v in top}}


def run_worker(runtime: str, args, paths: dict) -> dict:
    result = paths["work"] / f"{runtime}.json"
    common = ["--worker", runtime, "--result", str(result), "--cloud", paths["cloud"], "--identity",
              str(paths["identity"]), "--data", str(paths["eval"]), "--threads", str(args.threads),
              "--batch", str(args.batch)]
    if runtime == "torch":
        cmd = [sys.executable, __file__, *common, "--bundle", str(paths["bundle"]), "--adapter", str(paths["adapter"])]
    else:
        cmd = [sys.executable, "-c", BLOCK_TORCH, __file__, *common, "--model", str(paths[runtime])]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return json.loads(result.read_text())


def summarize(results: dict, meta: dict) -> dict:
    ref = results["torch"]
    rows = {}
    for name, r in results.items():
        n = len(r["predictions"])
        rows[name] = {
            "accuracy": sum(p == a for p, a in zip(r["predictions"], r["answers"])) / n,
            "agreement_with_torch": sum(p == q for p, q in zip(r["predictions"], ref["predictions"])) / n,
            "edge_tokens_per_s": r["tokens"] / r["edge_s"], "edge_s": r["edge_s"], "middle_wait_s": r["middle_s"],
            "tokens": r["tokens"], "peak_rss_mb": r["peak_rss_mb"], "load_s": r["load_s"], "rows": n,
            "torch_imported": r.get("torch_imported", True)}
    t = rows["torch"]
    goals = {
        "fp32 agreement >= 99.9%": rows["onnx-fp32"]["agreement_with_torch"] >= 0.999,
        "int8 accuracy within 1 point of torch": abs(rows["onnx-int8"]["accuracy"] - t["accuracy"]) <= 0.01,
    }
    for name in ("onnx-fp32", "onnx-int8"):
        r = rows[name]
        r["speedup_vs_torch"] = r["edge_tokens_per_s"] / t["edge_tokens_per_s"]
        r["rss_vs_torch"] = r["peak_rss_mb"] / t["peak_rss_mb"]
        goals[f"{name}: tokens/s >= 1.5x torch at <= 0.5x peak RSS"] = (r["speedup_vs_torch"] >= 1.5
                                                                      and r["rss_vs_torch"] <= 0.5)
    return {"meta": meta, "runtimes": rows, "goals": goals}


def markdown(s: dict) -> str:
    m, inst = s["meta"], s["meta"]["install"]
    lines = ["# Edge runtime benchmark: torch vs onnxruntime fp32 vs int8 (SmolLM2-135M)", "",
             f"Command: `{m['command']}` ({m['wall_s']:.0f} s wall). {m['rows']} Rotten Tomatoes eval rows "
             f"(client0 of `deploy/prepare_rotten_tomatoes.py`, seed 0), K=2, batch {m['batch']}, "
             f"{m['threads']} thread per runtime (torch.set_num_threads / ORT intra_op_num_threads), the middle "
             f"on a real `edgetune-cloud serve --threads 1` over loopback mutual TLS. Adapter: split LoRA "
             f"(all linear, r=8) trained in-process for {m['adapter']['steps']} steps (loss "
             f"{m['adapter']['first_loss']:.3f} -> {m['adapter']['last10_loss']:.3f}, mean of last 10).", "",
             "| runtime | accuracy | agreement with torch | edge tokens/s | x torch | peak RSS MiB | x torch | "
             "edge s | middle wait s | load s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["runtimes"].items():
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['agreement_with_torch']:.4f} | "
                     f"{r['edge_tokens_per_s']:.0f} | {r.get('speedup_vs_torch', 1.0):.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r.get('rss_vs_torch', 1.0):.2f} | {r['edge_s']:.1f} | {r['middle_wait_s']:.1f} | "
                     f"{r['load_s']:.1f} |")
    lines += ["", f"Install size (files in each distribution's RECORD, dependency closure, this venv): full "
              f"install {inst['full_mb']:.0f} MiB ({inst['full_packages']} distributions; largest "
              f"{inst['largest_in_full']}), `edge-runtime` extra {inst['edge_runtime_mb']:.0f} MiB "
              f"({', '.join(inst['edge_runtime_packages'])}): "
              f"{inst['edge_runtime_mb'] / inst['full_mb']:.3f}x.", "", "Goals:", ""]
    lines += [f"- {goal}: **{'met' if ok else 'not met'}**" for goal, ok in s["goals"].items()]
    lines += ["", "Edge seconds are each worker's batch loop minus its wait for the middle; tokens are the "
              "positions the bottom segment processes (padding included, the same batches for every runtime). "
              "Peak RSS is VmHWM of the worker process (imports, weights and activations). The onnx workers ran "
              "with torch, transformers and peft blocked from import.", ""]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--adapter", type=Path, help="a trained split adapter of smollm2-135m (skips training)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "edge_runtime_benchmark.json")
    for flag in ("--worker", "--result", "--cloud", "--identity", "--data", "--bundle", "--model"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("result", "identity", "data", "bundle", "model"):
        if getattr(args, name) is not None:
            setattr(args, name, Path(getattr(args, name)))
    return args


def prepare(args, work: Path) -> dict:
    from edge.runtime.export import export
    from emulator.model.bundle import write_bundle
    from emulator.model.loading import load_causal_lm, resolve_model
    from emulator.model.segments import plan_for
    from protocol.pki import init_pki, issue_client

    subprocess.run([sys.executable, "deploy/prepare_rotten_tomatoes.py", "--out", str(work / "rt"), "--clients", "1",
                    "--train-rows", "2000", "--eval-rows", str(args.rows)], check=True, cwd=REPO)
    model_dir = resolve_model("smollm2-135m")
    adapter, trained = args.adapter, {"steps": 0, "first_loss": float("nan"), "last10_loss": float("nan")}
    if adapter is None:
        adapter = work / "run" / "adapter"
        trained = train_adapter(model_dir, work / "rt" / "client0" / "train.jsonl", adapter, args.train_steps,
                                max(args.threads, 2))
    full = load_causal_lm(model_dir)
    bundle = write_bundle(full, model_dir, plan_for(full.config, 2), work / "bundles", "smollm2-135m")
    del full
    paths = {"work": work, "bundle": bundle, "adapter": adapter, "eval": work / "rt" / "client0" / "eval.jsonl"}
    for name, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
        paths[name] = export(adapter, work / name, quantize, bundle).out
    init_pki(work / "pki", ["127.0.0.1"])
    issue_client(work / "pki", "bench")
    paths["identity"] = work / "pki" / "clients" / "bench"
    return {"paths": paths, "adapter": trained}


def main() -> int:
    args = parse()
    if args.worker:
        result = worker_torch(args) if args.worker == "torch" else worker_onnx(args)
        args.result.write_text(json.dumps(result))
        return 0
    from tests.conftest import start_cloud, stop_cloud

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-edge-runtime-"))
    prepared = prepare(args, work)
    paths = prepared["paths"]
    cloud = start_cloud("smollm2-135m", work / "pki", work / "store", extra=["--edge-layers", "2"],
                        env={"OMP_WAIT_POLICY": "PASSIVE"}, timeout=600)
    try:
        paths["cloud"] = cloud.address
        results = {runtime: run_worker(runtime, args, paths) for runtime in RUNTIMES}
    finally:
        stop_cloud(cloud)
    meta = {"command": "python tests/benchmarks/bench_edge_runtime.py " + " ".join(sys.argv[1:]),
            "rows": args.rows, "batch": args.batch, "threads": args.threads, "adapter": prepared["adapter"],
            "install": install_sizes(), "wall_s": time.perf_counter() - start}
    summary = summarize(results, meta)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
