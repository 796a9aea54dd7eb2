"""Benchmark: the frozen middle in-process against Ray workers, for 1, 2 and 4 concurrent clients.

Runs SmolLM2-135M's middle (K=2: 26 blocks) at the backbone seam, the way the coordinator calls it:
each client is a thread that runs training steps (forward keeping the graph, then backward) of its own
session with ``(batch, seq, hidden)`` hidden states. Configurations, in one run on the same cores:

* ``local``: the in-process runner (today's ``serve``), shared by all clients;
* ``ray-1``, ``ray-2``: ``serve --backbone ray`` with 1 or 2 workers on this node (each worker's torch
  threads = cores / workers);
* each unbatched and batched (``--batch``: concurrent sessions coalesced into one call; the local
  batched row is the same batching runner in-process).

Measured: per-step latency at 1 client (local vs ray-1: what Ray adds), aggregate tokens/s at 1, 2, 4
clients, and what the stateless alternative to graph affinity would cost (one more forward per step,
from the local runner's forward and backward compute seconds). The edge's own compute and the gRPC hop
are the same in every configuration and are left out, so Ray's share of a full split step is smaller
than its share here.

    python tests/benchmarks/bench_scaleout.py --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cloud.backbone.batching import BatchingRunner  # noqa: E402
from cloud.backbone.ray_runner import RayPool, RaySettings, connect  # noqa: E402
from cloud.backbone.seam import BackboneRunner, local_runner  # noqa: E402
from cloud.errors import Unavailable  # noqa: E402
from emulator.model.loading import load_causal_lm, resolve_model  # noqa: E402
from emulator.model.segments import extract_middle, plan_for  # noqa: E402

K = 2
CLIENTS = (1, 2, 4)


def train_step(runner: BackboneRunner, session: str, step: int, hidden: torch.Tensor, grad: torch.Tensor,
               retries: list[int]) -> tuple[float, float]:
    """One training step at the seam; retried whole on ``Unavailable`` as the edge does (a worker died)."""
    for _ in range(20):
        try:
            _, fwd = runner.forward(session, step, hidden, True)
            _, bwd = runner.backward(session, step, grad)
            return fwd, bwd
        except Unavailable:  # Ray restarts the worker; its model loads again meanwhile
            retries.append(step)
            time.sleep(5.0)
    raise RuntimeError(f"{session}: step {step} failed 20 times")


def run_clients(runner: BackboneRunner, clients: int, steps: int, shape: tuple[int, int, int],
                tag: str) -> dict[str, object]:
    """``clients`` threads, each 1 warm-up step then ``steps`` timed training steps on its own session."""
    barrier, lat, comp = threading.Barrier(clients + 1), [[] for _ in range(clients)], [[] for _ in range(clients)]
    retries: list[int] = []
    torch.manual_seed(0)
    hidden, grad = torch.randn(*shape), torch.randn(*shape)

    def client(i: int) -> None:
        session = f"{tag}-{clients}-{i}"
        for step in range(steps + 1):
            if step == 1:
                barrier.wait()
            t0 = time.perf_counter()
            fwd, bwd = train_step(runner, session, step, hidden, grad, retries)
            if step >= 1:
                lat[i].append(time.perf_counter() - t0)
                comp[i].append((fwd, bwd))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = clients * steps * shape[0] * shape[1]
    flat = [x for per in lat for x in per]
    return {"clients": clients, "steps_per_client": steps, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "step_median_s": round(statistics.median(flat), 4),
            "fwd_compute_median_s": round(statistics.median(c[0] for per in comp for c in per), 4),
            "bwd_compute_median_s": round(statistics.median(c[1] for per in comp for c in per), 4),
            "retried_steps": len(retries)}


def alternate(runners: dict[str, BackboneRunner], rounds: int, shape: tuple[int, int, int]) -> dict[str, object]:
    """1-client step latency of each runner, taking turns step by step (so machine drift hits all alike)."""
    torch.manual_seed(0)
    hidden, grad = torch.randn(*shape), torch.randn(*shape)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(rounds + 1):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            train_step(runner, f"lat-{name}", step, hidden, grad, [])
            if step:  # step 0 warms up
                times[name].append(time.perf_counter() - t0)
    out: dict[str, object] = {f"{n}_step_median_s": round(statistics.median(t), 4) for n, t in times.items()}
    out["steps"] = {n: [round(x, 4) for x in t] for n, t in times.items()}
    print(json.dumps(out), flush=True)
    return out


def sweep(name: str, make: Callable[[], tuple[BackboneRunner, Callable[[], None]]], steps: int,
          shape: tuple[int, int, int]) -> list[dict[str, object]]:
    runner, close = make()
    rows = []
    try:
        for clients in CLIENTS:
            row = {"config": name, **run_clients(runner, clients, steps, shape, name)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2, help="cores used: local torch threads, split among workers")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per client (after 1 warm-up)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating 1-client latency steps per runner")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--window-ms", type=float, default=20.0, help="batching window")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "scaleout_benchmark")
    ap.add_argument("--report-only", action="store_true", help="rewrite the Markdown from --out's JSON")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        report = summarise(saved["rows"], saved["latency_1_client"], args, tuple(saved["loadavg_before"]),
                           tuple(saved["loadavg_after"]))
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(markdown(report))
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model_dir = resolve_model(args.model)
    model = load_causal_lm(model_dir, dtype=torch.float32).requires_grad_(False)
    shape = (args.batch, args.seq, model.config.hidden_size)
    middle = extract_middle(model, plan_for(model.config, K))  # shared by the local runners; none changes it
    del model  # memory: the machine's other jobs leave little, and Ray's workers load their own copies
    window = args.window_ms / 1000
    # Ray's memory monitor kills the newest worker above 95% of the node's memory; on a machine shared with
    # other jobs that is their memory, not ours, so it is off for this run (a killed worker is retried anyway).
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    started = connect(RaySettings(local_cpus=args.threads))

    def local(batched: bool) -> Callable[[], tuple[BackboneRunner, Callable[[], None]]]:
        def make() -> tuple[BackboneRunner, Callable[[], None]]:
            if batched:
                runner = BatchingRunner(middle, None, window)
                return runner, runner.close
            return local_runner(middle), lambda: None
        return make

    def ray(workers: int, batched: bool) -> Callable[[], tuple[BackboneRunner, Callable[[], None]]]:
        def make() -> tuple[BackboneRunner, Callable[[], None]]:
            settings = RaySettings(None, workers, max(1, args.threads // workers), batched, window)
            pool = RayPool(settings, model_dir, args.model)
            return pool.runner(K), lambda: pool.close(shutdown=False)
        return make

    ray1 = ray(1, False)()
    latency = alternate({"local": local_runner(middle), "ray-1": ray1[0]}, args.rounds, shape)
    rows: list[dict] = []
    for batched in (False, True):
        suffix = "+batch" if batched else ""
        for name, make in (("local", local(batched)), ("ray-1", (lambda: ray1) if not batched else ray(1, True)),
                           ("ray-2", ray(2, batched))):
            rows += sweep(name + suffix, make, args.steps, shape)
            partial = {"partial": True, "latency_1_client": latency, "rows": rows, "shape": [args.batch, args.seq],
                       "loadavg_now": [round(x, 2) for x in os.getloadavg()]}
            args.out.with_suffix(".json").write_text(json.dumps(partial, indent=1))  # survives an interrupted run
    if started:
        import ray as ray_module

        ray_module.shutdown()
    report = summarise(rows, latency, args, load_before, os.getloadavg())
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def summarise(rows: list[dict], latency: dict, args: argparse.Namespace, load_before: tuple,
              load_after: tuple) -> dict:
    at = {(r["config"], r["clients"]): r for r in rows}
    local1 = at[("local", 1)]
    # The goal's ratio: the 1-client sweeps (each runner alone on the cores). The alternating latency is
    # reported beside it: there the in-process runner shares its process with the Ray driver's threads.
    overhead = at[("ray-1", 1)]["step_median_s"] / local1["step_median_s"] - 1
    alternating = latency["ray-1_step_median_s"] / latency["local_step_median_s"] - 1
    best_local4 = at[("local", 4)]["tokens_per_s"]
    ray2_4 = max(at[("ray-2", 4)]["tokens_per_s"], at[("ray-2+batch", 4)]["tokens_per_s"])
    fwd, bwd = local1["fwd_compute_median_s"], local1["bwd_compute_median_s"]
    return {
        "model": args.model, "edge_layers": K, "shape": [args.batch, args.seq], "cores": args.threads,
        "steps_per_client": args.steps, "batch_window_ms": args.window_ms,
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "latency_1_client": latency, "rows": rows,
        "ray_overhead_at_1_client": round(overhead, 4), "ray_overhead_alternating": round(alternating, 4),
        "goal_ray_overhead_le_15pct": overhead <= 0.15,
        "ray2_over_local_at_4_clients": round(ray2_4 / best_local4, 4),
        "goal_ray2_ge_0_9x_local_at_4": ray2_4 / best_local4 >= 0.9,
        "stateless_recompute_cost": round((2 * fwd + bwd) / (fwd + bwd) - 1, 4),
        "batched_over_unbatched": {c: round(at[(c + "+batch", 4)]["tokens_per_s"] / at[(c, 4)]["tokens_per_s"], 3)
                                   for c in ("local", "ray-1", "ray-2")},
    }


def markdown(r: dict) -> str:
    retried = sum(row.get("retried_steps", 0) for row in r["rows"])
    lines = [f"# Scale-out benchmark: {r['model']} middle (K={r['edge_layers']}), "
             f"{r['shape'][0]}x{r['shape'][1]} tokens per step, {r['cores']} cores",
             "", "Generated by `python tests/benchmarks/bench_scaleout.py` (see its docstring for what is measured).",
             f"Load average before/after: {r['loadavg_before']} / {r['loadavg_after']} "
             f"(on {os.cpu_count()} cores; above ~{r['cores']} means other work shared the cores during the run).",
             f"Steps retried after a worker died (as the edge retries them): {retried}.",
             "", "| config | clients | tokens/s | step median (s) | fwd compute (s) | bwd compute (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['config']} | {row['clients']} | {row['tokens_per_s']} | {row['step_median_s']} | "
                     f"{row['fwd_compute_median_s']} | {row['bwd_compute_median_s']} |")
    lat = r["latency_1_client"]
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    lines += ["", f"1-client step latency, local and ray-1 taking turns step by step ({len(lat['steps']['local'])} "
              f"steps each): local median {lat['local_step_median_s']} s, ray-1 median {lat['ray-1_step_median_s']} s "
              f"({r['ray_overhead_alternating']:+.0%}); per step: local {lat['steps']['local']}, ray-1 "
              f"{lat['steps']['ray-1']}. The goal below uses the 1-client rows of the table (each runner alone).",
              "", "| goal | measured | |", "|---|---:|---|",
              f"| Ray adds at most 15% to a step at 1 client | {r['ray_overhead_at_1_client']:+.1%} | "
              f"{met(r['goal_ray_overhead_le_15pct'])} |",
              f"| Ray-2 at 4 clients >= 0.9x local tokens/s | {r['ray2_over_local_at_4_clients']:.2f}x | "
              f"{met(r['goal_ray2_ge_0_9x_local_at_4'])} |",
              "", f"Stateless recompute instead of affinity would add {r['stateless_recompute_cost']:.0%} to each "
              "step's middle compute (one more forward).",
              f"Batched / unbatched tokens/s at 4 clients: {r['batched_over_unbatched']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
