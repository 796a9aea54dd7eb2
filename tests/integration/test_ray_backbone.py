"""The frozen middle on a real local Ray instance (``serve --backbone ray``), against the in-process runner.

One Ray instance (2 CPUs) is shared by the module; the coordinator joins it with ``--ray-address``
and starts two middle workers on it. Every comparison is with the in-process (local) runner.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from edge.modes.split import LocalMiddle, score_examples
from emulator.data.datasets import load_eval
from emulator.model.arch import arch_for
from emulator.model.loading import load_causal_lm
from emulator.model.runner import SegmentRunner
from emulator.model.segments import extract_middle, plan_for, split_causal_lm
from protocol.accounting import Traffic
from tests.cloud import test_evaluate
from tests.conftest import REPO, start_cloud, stop_cloud
from tests.tiny_models import tiny_tokenizer, write_toy_sentiment

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration
STEPS = 30
registered = test_evaluate.registered  # a fixture: an adapter registered in a store, with its eval rows


@pytest.fixture(scope="module")
def ray_address():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_cloud(tiny_dirs, pki, tmp_path_factory, ray_address):
    cloud = start_cloud(str(tiny_dirs["llama"]), pki, tmp_path_factory.mktemp("ray-store"),
                        ["--backbone", "ray", "--ray-address", ray_address, "--ray-workers", "2",
                         "--ray-worker-threads", "1"], timeout=300)
    yield cloud
    stop_cloud(cloud)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_toy_sentiment(directory)
    return directory


def edge(cloud, pki, data, out, name, seed, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "train", "--cloud", cloud.address, "--identity", str(pki / "clients" / name),
         "--data", str(data / "train.jsonl"), "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
         "--lr", "1e-2", "--warmup-steps", "0", "--no-eval-before", "--seed", str(seed), "--out", str(out),
         "--threads", "1", *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs):
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]


def losses(run):
    return [s["loss"] for s in json.loads((run / "metrics.json").read_text())["per_step"]]


def status(cloud):
    path = cloud.store / "backbone-status.json"
    return json.loads(path.read_text()) if path.exists() else {"workers": []}


@pytest.fixture(scope="module")
def local_runs(tiny_cloud, pki, data, tmp_path_factory):
    """alice (seed 1) and bob (seed 2) against the in-process middle: the reference losses."""
    root = tmp_path_factory.mktemp("local-runs")
    runs = {n: root / n for n in ("alice", "bob")}
    finish([edge(tiny_cloud, pki, data, runs["alice"], "alice", 1), edge(tiny_cloud, pki, data, runs["bob"], "bob", 2)])
    return {n: losses(r) for n, r in runs.items()}


def test_two_edges_concurrently_match_the_local_runner(ray_cloud, pki, data, tmp_path, local_runs):
    runs = {n: tmp_path / n for n in ("alice", "bob")}
    finish([edge(ray_cloud, pki, data, runs["alice"], "alice", 1), edge(ray_cloud, pki, data, runs["bob"], "bob", 2)])
    for name, run in runs.items():
        got, want = losses(run), local_runs[name]
        assert len(got) == STEPS
        assert got[-1] == pytest.approx(want[-1], rel=1e-4), name
    time.sleep(2.5)  # the status file is rewritten every 2 s
    workers = status(ray_cloud)["workers"]
    assert len(workers) == 2 and all(w["live"] for w in workers)
    # least-loaded placement: the two concurrent sessions went to different workers
    assert sorted(w["active_sessions"] for w in workers) == [1, 1]
    assert all(w["stats"]["K=2"]["compute_s"] > 0 for w in workers)


def test_worker_killed_mid_run_fails_neither_run(ray_cloud, pki, data, tmp_path, local_runs):
    runs = {n: tmp_path / n for n in ("alice", "bob")}
    procs = [edge(ray_cloud, pki, data, runs["alice"], "alice", 1), edge(ray_cloud, pki, data, runs["bob"], "bob", 2)]
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:  # kill once the runs are under way
        busy = [w for w in status(ray_cloud)["workers"]
                if w["live"] and isinstance(w["stats"], dict) and w["stats"].get("K=2", {}).get("requests", 0) > 10
                and w["active_sessions"] > 0]
        victim = busy[0] if busy else None
        time.sleep(0.2)
    assert victim is not None, "the runs never got under way"
    os.kill(victim["pid"], signal.SIGKILL)
    finish(procs)
    for name, run in runs.items():
        assert losses(run)[-1] == pytest.approx(local_runs[name][-1], rel=1e-4), name
    log = ray_cloud.log.read_text()
    assert f"pid {victim['pid']}" in log and "lost" in log  # the coordinator saw the worker die


def test_dlora_through_ray_matches_local(ray_cloud, tiny_cloud, pki, data, tmp_path):
    extra = ["--mode", "dlora", "--lora-rank", "4"]
    procs = [edge(c, pki, data, tmp_path / n, "alice", 3, *extra, "--steps", "4")
             for n, c in (("local", tiny_cloud), ("ray", ray_cloud))]
    finish(procs)
    assert losses(tmp_path / "ray")[-1] == pytest.approx(losses(tmp_path / "local")[-1], rel=1e-4)


def test_offsite_plug_in_evaluation_through_ray(ray_cloud, pki, tiny_dirs, tmp_path):
    from tests.integration.test_offsite import run_edge, write_data

    data = write_data(tmp_path / "data", 16)
    who = ["--cloud", ray_cloud.address, "--identity", str(pki / "clients" / "bob")]
    run_edge(["train", *who, "--mode", "offsite", "--data", str(data / "train.jsonl"), "--steps", "2",
              "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "0", "--lora-rank", "4",
              "--no-eval-before", "--out", str(tmp_path / "run")])
    report = json.loads(run_edge(["eval", *who, "--mode", "offsite", "--data", str(data / "eval.jsonl"),
                                  "--adapter", str(tmp_path / "run" / "adapter"), "--seq-len", "32"]))
    full = load_causal_lm(tiny_dirs["llama"])
    split = split_causal_lm(full, 2)
    from emulator.adapters.plugin import apply_to_edge

    tuned = apply_to_edge(split.edge, tmp_path / "run" / "adapter", arch_for(full.config))
    examples = load_eval(data / "eval.jsonl", tiny_tokenizer(), 32).examples
    predictions = score_examples(tuned, LocalMiddle(split.middle), examples, 0, Traffic())
    expected = sum(p == ex.answer for p, ex in zip(predictions, examples)) / len(examples)
    assert report["eval_plug_in"] == pytest.approx(expected) and report["eval_bytes_sent"] > 0


def test_batched_workers_equal_per_session_calls(ray_address, tiny_dirs):
    """Four sessions of different sequence lengths at once on one batching Ray worker == the local runner."""
    from cloud.backbone.ray_runner import RayPool, RaySettings

    model = load_causal_lm(tiny_dirs["llama"])
    plain = SegmentRunner(extract_middle(model, plan_for(model.config, 2)))
    shapes = [(2, 5), (1, 9), (3, 3), (2, 7)]
    torch.manual_seed(3)
    xs = [torch.randn(b, s, model.config.hidden_size) for b, s in shapes]
    gs = [torch.randn_like(x) for x in xs]
    want = []
    for i in range(4):
        plain.forward(i, 1, xs[i], True)
        want.append(plain.backward(i, 1, gs[i])[0])
    pool = RayPool(RaySettings(ray_address, 1, 1, batch=True, batch_window_s=0.3), tiny_dirs["llama"], "tiny")
    try:
        runner, got, barrier = pool.runner(2), [None] * 4, threading.Barrier(4)

        def session(i):
            barrier.wait()
            out, _ = runner.forward(f"s{i}", 1, xs[i], True)
            barrier.wait()
            got[i] = (out, runner.backward(f"s{i}", 1, gs[i])[0])

        threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stats = pool.status()["workers"][0]["stats"]["K=2"]
        assert max(int(n) for n in stats["batch_sizes"]) > 1  # calls were coalesced
        fresh = SegmentRunner(extract_middle(model, plan_for(model.config, 2)))
        for i in range(4):
            expected_out, _ = fresh.forward(0, 0, xs[i], False)
            torch.testing.assert_close(got[i][0], expected_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[i][1], want[i], rtol=1e-5, atol=1e-5)
    finally:
        pool.close(shutdown=False)


def test_unreachable_cluster_is_one_line_and_exit_2(tiny_dirs, pki, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cloud.cli", "serve", "--model", str(tiny_dirs["llama"]), "--pki",
                           str(pki), "--store", str(tmp_path), "--listen", "127.0.0.1:0", "--backbone", "ray",
                           "--ray-address", "127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--ray-address 127.0.0.1:9" in lines[0] and "Traceback" not in proc.stderr


def test_owner_evaluate_as_a_ray_task_equals_in_process(ray_address, tiny_dirs, registered):
    from cloud.backbone.ray_runner import RaySettings
    from cloud.owner.evaluate import EvaluateConfig, evaluate_recipe

    store, adapter_id, data, _, _ = registered
    here = evaluate_recipe(EvaluateConfig(str(tiny_dirs["llama"]), store, adapter_id, data, baseline=True, batch=5))
    there = evaluate_recipe(EvaluateConfig(str(tiny_dirs["llama"]), store, adapter_id, data, baseline=True, batch=5,
                                           ray=RaySettings(ray_address)))
    assert there == here
