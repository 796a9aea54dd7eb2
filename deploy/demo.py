"""The main job (``make demo``): one edge client fine-tunes SmolLM2-135M on its private reviews.

Recipe: prepare the client's Rotten Tomatoes partition -> create a PKI and the client identity ->
build (once; cached) the offsite emulator -> start the cloud coordinator on loopback ->
train with the edge client in split mode and in offsite mode (evaluating before and after) -> pull the
adapters back in PEFT format -> print a table -> stop the cloud. Everything lands in ``--out``
(default ``demo-out/``) except the emulator cache, which outlives it. The edge's data files never
leave that client's directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloud.store.emulators import DEFAULT_SELECTION, model_fingerprint  # noqa: E402
from deploy.prepare_rotten_tomatoes import prepare  # noqa: E402
from emulator.model.loading import cache_root, resolve_model  # noqa: E402
from protocol.pki import init_pki, issue_client  # noqa: E402


@dataclass(frozen=True)
class DemoRun:
    """One training run of the demo: a mode and the flags that differ from the defaults."""

    name: str
    args: list[str] = field(default_factory=list)


RUNS = [
    DemoRun("split", ["--mode", "split"]),
    # LoRA (q/v) on every block, all of it kept on the edge; Kill-and-Revive trains every module for 10
    # warm-up steps, then keeps the best 10% active between probes every 50 steps; int8 activations.
    # Zero-shot is the split run's (same base model, same eval rows).
    DemoRun("dlora+KR", ["--mode", "dlora", "--kr-budget", "0.1", "--kr-warmup", "10", "--kr-probe-every", "50",
                         "--lr", "1e-3", "--wire-dtype", "int8", "--no-eval-before"]),
    # Offsite trains offline against the emulator, which the edge runs in bf16 (frozen; the adapter
    # trains in fp32), with the default --tune lora-top (LoRA on the top adapter blocks only, no backward
    # through the emulator); before/after are the emulator's accuracies.
    DemoRun("offsite", ["--mode", "offsite", "--emulator-dtype", "bfloat16"]),
]
# The model owner runs the frozen middle in bf16 (the checkpoint's own dtype): about 1.5x faster per
# training step on these CPUs than fp32; activations still cross the wire as each run asks.
BACKBONE_DTYPE = "bfloat16"
# The default 2-8-2 emulator of docs/offsite_benchmark.md (cloud.store.emulators.default_spec): the 8 middle
# blocks whose removal costs the most LM loss on the cloud's own text (convention speeches and debates, never
# the edge's data). Training-free: the first build measures importance once (about a minute), later demos
# reuse it.
EMULATOR = ["--edge-layers", "2", "--emulator-layers", "8", "--selection", DEFAULT_SELECTION]
# The runs whose "before" is a zero-shot accuracy of something the demo does not change (split: the full
# model; offsite: the emulator). A later demo on the same model, rows, settings and code reuses them from
# the model owner's cache instead of measuring them again (about 50 s); --remeasure-baselines measures anew.
BASELINE_RUNS = ("split", "offsite")
CODE = ("cloud", "edge", "emulator", "protocol", "deploy")  # whose sources a cached baseline depends on


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "demo-out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for each of cloud and edge")
    ap.add_argument("--modes", default=",".join(r.name for r in RUNS),
                    help="comma-separated runs to do (split first: its zero-shot evaluation is shared)")
    ap.add_argument("--remeasure-baselines", action="store_true",
                    help="evaluate the zero-shot accuracies again instead of reusing an earlier demo's")
    args = ap.parse_args()
    runs = [r for r in RUNS if r.name in args.modes.split(",")]
    if not runs or runs[0].name != "split":
        ap.error(f"--modes must start with split (its zero-shot evaluation is shared); known: "
                 f"{', '.join(r.name for r in RUNS)}")
    start = time.perf_counter()
    if args.out.exists():
        shutil.rmtree(args.out)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "EDGETUNE_CACHE": str(args.out / "edge-cache"),
           "PYTHONUNBUFFERED": "1"}
    (args.out / "edge-cache").mkdir(parents=True)
    stage(start, "1/5 data: the client's private Rotten Tomatoes partition")
    prepare(args.out / "data", clients=1, train_rows=args.train_rows, eval_rows=args.eval_rows, seed=0)
    client_dir = args.out / "data" / "client0"
    stage(start, "2/5 identities: CA, server certificate, client certificate")
    init_pki(args.out / "pki", ["localhost", "127.0.0.1"])
    identity = issue_client(args.out / "pki", "client0")
    stage(start, "3/5 cloud: SmolLM2-135M coordinator on loopback (mutual TLS), with its offsite emulator")
    resolve_model("smollm2-135m")  # converts the GGUF once, before the clock of the cloud starts
    cloud_env = {**env, "EDGETUNE_CACHE": str(cache_root())}  # the model owner's cache: converted model, emulator
    if any(r.name == "offsite" for r in runs):
        prepare_emulator(args.out / "store", args.threads, cloud_env)
    cloud, address = start_cloud(args.out, args.threads, cloud_env)
    cache = cache_root() / "demo-cloud-store" / "baselines.json"
    key = baseline_key(client_dir, args)
    known = {} if args.remeasure_baselines else cached_baselines(cache, key)
    try:
        results = {}
        for run in runs:
            reuse = run.name in known
            stage(start, f"4/5 edge: {run.name} training ({args.steps} steps)"
                  + (f"; zero-shot {known[run.name]:.3f} from an earlier demo's measurement" if reuse else ""))
            results[run.name] = train(run, address, identity, client_dir, args, env, reuse)
            if reuse:
                results[run.name].update(eval_accuracy_before=known[run.name], before_reused=True)
        store_baselines(cache, key, {n: m["eval_accuracy_before"] for n, m in results.items()
                                     if n in BASELINE_RUNS and not m.get("before_reused")})
        stage(start, "5/5 pull: the fine-tuned adapters in PEFT format"
              + (", while the offsite adapter is evaluated plugged into the full model" if "offsite" in results
                 else ""))
        pulls = {name: subprocess.Popen([sys.executable, "-m", "edge.cli", "pull", "--cloud", address, "--identity",
                                         str(identity), "--adapter", metrics["adapter_id"], "--out",
                                         str(args.out / "pulled" / name)], cwd=REPO, env=env)
                 for name, metrics in results.items()}  # light I/O: all at once, beside the plug-in eval
        if "offsite" in results:
            results["offsite"]["plug_in"] = plug_in(address, identity, client_dir, args, env)
        failed = [name for name, proc in pulls.items() if proc.wait() != 0]
        if failed:
            raise SystemExit(f"edgetune-edge pull failed for {', '.join(failed)}")
    finally:
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(timeout=30)
    print(table(results, time.perf_counter() - start))
    return 0


def baseline_key(client_dir: Path, args) -> str:
    """What the zero-shot accuracies depend on: the model's content, the eval rows, the runs' settings
    and the code (every source file of the packages that build, split, run and score the model)."""
    digest = hashlib.sha256(model_fingerprint(resolve_model("smollm2-135m")).encode())
    digest.update((client_dir / "eval.jsonl").read_bytes())
    digest.update(json.dumps([EMULATOR, BACKBONE_DTYPE, args.threads, [(r.name, r.args) for r in RUNS]]).encode())
    for path in sorted(p for package in CODE for p in (REPO / package).rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def cached_baselines(cache: Path, key: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(cache.read_text()).get(key, {}).items() if k in BASELINE_RUNS}
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: measure
        return {}


def store_baselines(cache: Path, key: str, measured: dict[str, float]) -> None:
    if not measured:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    known = {key: {**(known.get(key) or {}), **measured}}  # only the current key: older ones are stale
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    tmp.replace(cache)


def stage(start: float, text: str) -> None:
    """A stage header with the seconds the demo has run so far."""
    print(f"== {text}  [{time.perf_counter() - start:.0f} s]", flush=True)


def start_cloud(out: Path, threads: int, env: dict) -> tuple[subprocess.Popen, str]:
    port_file = out / "cloud.port"
    log = (out / "cloud.log").open("w")
    cloud = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "serve", "--model", "smollm2-135m", "--pki", str(out / "pki"),
         "--listen", "127.0.0.1:0", "--store", str(out / "store"), "--threads", str(threads),
         "--port-file", str(port_file), "--backbone-dtype", BACKBONE_DTYPE],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    while not port_file.exists():
        if cloud.poll() is not None:
            raise SystemExit(f"cloud failed to start; see {out / 'cloud.log'}")
        time.sleep(0.2)
    return cloud, f"127.0.0.1:{port_file.read_text()}"


def prepare_emulator(store: Path, threads: int, env: dict) -> None:
    """Builds the default emulator once into a cache that outlives ``--out`` and gives the cloud a copy.

    The first build measures the middle blocks' importance (26 forward passes over 8 x 64 tokens of the
    cloud's text); later demos reuse it.
    """
    cached = cache_root() / "demo-cloud-store"
    proc = subprocess.run([sys.executable, "-m", "cloud.cli", "emulator", "build", "--model", "smollm2-135m",
                           "--store", str(cached), "--threads", str(threads), *EMULATOR], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit("building the offsite emulator failed")
    for built in (cached / "emulators").iterdir():
        if built.is_dir() and not built.name.endswith(".partial"):
            shutil.copytree(built, store / "emulators" / built.name, dirs_exist_ok=True)


def plug_in(address: str, identity: Path, data: Path, args, env: dict) -> float:
    """The offsite adapter plugged into the full model, by split inference against the cloud's middle."""
    adapter = args.out / "runs" / "offsite" / "adapter"
    out = subprocess.run([sys.executable, "-m", "edge.cli", "eval", "--cloud", address, "--identity", str(identity),
                          "--data", str(data / "eval.jsonl"), "--adapter", str(adapter)],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"edgetune-edge eval failed: {out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["eval_accuracy"])


def edge_cli(argv: list[str], env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "edge.cli", *argv], cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"edgetune-edge {argv[0]} failed with exit code {proc.returncode}")


def train(run: DemoRun, address: str, identity: Path, data: Path, args, env: dict, reuse_before: bool) -> dict:
    out = args.out / "runs" / run.name
    skip = ["--no-eval-before"] if reuse_before and "--no-eval-before" not in run.args else []
    edge_cli(["train", "--cloud", address, "--identity", str(identity), "--data", str(data / "train.jsonl"),
              "--eval", str(data / "eval.jsonl"), "--steps", str(args.steps), "--threads", str(args.threads),
              "--out", str(out), *run.args, *skip], env)
    return json.loads((out / "metrics.json").read_text())


def table(results: dict[str, dict], wall_s: float) -> str:
    head = ("| mode | evaluated on | eval acc before | eval acc after | train MB up | train MB down | setup MB down "
            "| edge GFLOP | edge LoRA GFLOP | exchanges | cloud compute s | train wall s |")
    lines = ["", head, "|" + "---|" * 12]
    zero_shot = results["split"]["eval_accuracy_before"]
    for name, m in results.items():
        where = "emulator (edge only)" if name == "offsite" else "full model (split inference)"
        before = m.get("eval_accuracy_before") or zero_shot
        # a run that measured no "before" of its own shows split's zero-shot, reused or not
        reused = m.get("before_reused") if m.get("eval_accuracy_before") else results["split"].get("before_reused")
        mark = "*" if reused else ""
        lines.append(f"| {name} | {where} | {before:.3f}{mark} | {m['eval_accuracy_after']:.3f} | "
                     f"{m['bytes_sent'] / 1e6:.1f} | {m['bytes_received'] / 1e6:.1f} | "
                     f"{m['setup_bytes_received'] / 1e6:.1f} | {m['edge_flops'] / 1e9:.0f} | "
                     f"{m.get('lora_flops', 0) / 1e9:.1f} | {m['round_trips']} | "
                     f"{m['cloud_compute_s']:.0f} | {m['train_wall_s']:.0f} |")
        if name == "offsite":
            mark = "*" if results["split"].get("before_reused") else ""
            lines.append(f"| offsite, plugged in | full model (split inference) | {zero_shot:.3f}{mark} | "
                         f"{m['plug_in']:.3f} | (upload {m['upload_bytes_sent'] / 1e6:.1f}) | | | | | | | |")
    rows = results["split"]["eval_rows"]
    if "offsite" in results:
        o = results["offsite"]
        lines += ["", f"offsite trained offline against the emulator (blocks {o['emulator'].get('blocks')}) with "
                  f"0 bytes on the wire between the bundle download and the adapter upload."]
    lines += ["", f"Eval on {rows} held-out rows (movies disjoint from training); before = full-model zero-shot "
              f"except for the emulator row. Demo wall time {wall_s:.0f} s.",
              *(["* zero-shot measured by an earlier demo on the same model, rows, settings and code (kept in "
                 f"{cache_root() / 'demo-cloud-store' / 'baselines.json'}; --remeasure-baselines measures it "
                 "again)."] if any(m.get("before_reused") for m in results.values()) else []),
              "Per-step figures: demo-out/runs/<mode>/metrics.json; adapters: demo-out/pulled/<mode>/."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
