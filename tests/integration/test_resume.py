"""Faults mid-run: an edge killed and resumed (split, dlora, offsite), and a cloud SIGKILLed and restarted
(split, dlora: the modes that need the cloud while training), end with the same adapter as an
uninterrupted run, bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, start_cloud, stop_cloud

pytestmark = pytest.mark.integration
STEPS = 40
MODES = {
    "split": ["--mode", "split", "--lr", "1e-2"],
    "dlora": ["--mode", "dlora", "--lr", "1e-2", "--kr-budget", "0.5", "--kr-probe-every", "4"],
    "offsite": ["--mode", "offsite", "--lr", "1e-2"],  # offline against the emulator: only the edge can fail
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-data")
    rows = [{"prompt": f"Review: {'good' if i % 3 else 'bad'} {i}\nSentiment:",
             "completion": " positive" if i % 3 else " negative"} for i in range(40)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl"


def train_cmd(cloud, pki, data, out, mode, *extra):
    return [sys.executable, "-m", "edge.cli", "train", "--cloud", cloud.address, "--identity",
            str(pki / "clients" / "alice"), "--data", str(data), "--steps", str(STEPS), "--batch-size", "4",
            "--seq-len", "32", "--warmup-steps", "2", "--checkpoint-every", "3", "--threads", "1", *MODES[mode],
            *extra, *(["--out", str(out)] if "--resume" not in extra else [])]


def checkpoint_step(run):
    path = run / "checkpoint" / "state.json"
    try:
        return json.loads(path.read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def wait_for_step(run, proc, step, timeout=120):
    deadline = time.time() + timeout
    while checkpoint_step(run) < step:
        assert proc.poll() is None, f"edge exited early: {proc.stderr.read() if proc.stderr else ''}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def adapter(run):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] == b[key]).all(), key


@pytest.mark.parametrize("mode", list(MODES))
def test_edge_killed_then_resumed_is_bit_identical(mode, tiny_cloud, pki, data, tmp_path):
    ref = subprocess.run(train_cmd(tiny_cloud, pki, data, tmp_path / "ref", mode), cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_cloud, pki, data, run, mode), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(run, proc, 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = checkpoint_step(run)
    assert killed_at < STEPS and not (run / "adapter").exists()
    resumed = subprocess.run(train_cmd(tiny_cloud, pki, data, run, mode, "--resume", str(run)), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after step {killed_at}" in resumed.stdout
    assert_same(adapter(tmp_path / "ref"), adapter(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and [s["step"] for s in metrics["per_step"]] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("mode", ["split", "dlora"])
def test_cloud_sigkilled_and_restarted_mid_run(mode, tiny_dirs, pki, data, tmp_path):
    store = tmp_path / "store"
    cloud = start_cloud(str(tiny_dirs["llama"]), pki, store)
    try:
        ref = subprocess.run(train_cmd(cloud, pki, data, tmp_path / "ref", mode), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert ref.returncode == 0, ref.stderr
        run = tmp_path / "run"
        proc = subprocess.Popen(train_cmd(cloud, pki, data, run, mode), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_step(run, proc, 6)
        os.kill(cloud.process.pid, signal.SIGKILL)  # no chance to clean up
        cloud.process.wait(timeout=10)
        time.sleep(0.5)
        cloud = start_cloud(str(tiny_dirs["llama"]), pki, store, listen=cloud.address)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "cloud unreachable (UNAVAILABLE); retrying the step" in out
        assert_same(adapter(tmp_path / "ref"), adapter(run))
    finally:
        stop_cloud(cloud)
