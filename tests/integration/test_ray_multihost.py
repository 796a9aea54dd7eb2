"""Two hosts: the coordinator and the Ray head in one network namespace, a Ray worker node in another.

The namespaces are joined by a veth pair, so the worker node reaches the head only over that link,
as a second machine would. The worker node joins *after* the coordinator serves: its middle worker
must take new sessions without a restart. Needs root and iproute2; skipped (saying why) otherwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.tiny_models import write_toy_sentiment

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}  # `ray start` clusters require the token (~/.ray/auth_token)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` for network namespaces"
    if not Path(RAY).exists():
        return "the `ray` command is not installed beside this Python"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces ``(head, worker)`` with addresses ``10.213.N.1`` and ``10.213.N.2``."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    n = os.getpid() % 200 + 20
    head, worker, subnet = f"eth{n}", f"etw{n}", f"10.213.{n}"
    try:
        _ip("netns", "add", head)
        _ip("netns", "add", worker)
        _ip("link", "add", f"vh{n}", "type", "veth", "peer", "name", f"vw{n}")
    except subprocess.CalledProcessError as err:
        subprocess.run(["ip", "netns", "del", head], capture_output=True)
        subprocess.run(["ip", "netns", "del", worker], capture_output=True)
        pytest.skip(f"this machine does not allow network namespaces: {err.stderr.strip()}")
    for ns, dev, addr in ((head, f"vh{n}", f"{subnet}.1"), (worker, f"vw{n}", f"{subnet}.2")):
        _ip("link", "set", dev, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    yield head, worker, subnet
    subprocess.run(["ip", "netns", "del", head], capture_output=True)
    subprocess.run(["ip", "netns", "del", worker], capture_output=True)


def _in(ns: str, cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=REPO, env=ENV, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the node's processes on SIGTERM
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait(what: str, ok, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _losses(run: Path) -> list[float]:
    return [s["loss"] for s in json.loads((run / "metrics.json").read_text())["per_step"]]


def test_a_worker_on_another_host_joins_and_takes_sessions(hosts, tiny_dirs, pki, tiny_cloud, tmp_path):
    head_ns, worker_ns, subnet = hosts
    # Inside a private namespace nothing else can hold the port, so Ray's default port is safe here.
    address = f"{subnet}.1:6379"
    head = _in(head_ns, [RAY, "start", "--head", "--node-ip-address", f"{subnet}.1", "--port", "6379",
                         "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats", "--block"],
               tmp_path / "head.log")
    procs = [head]
    try:
        store, port_file = tmp_path / "store", tmp_path / "port"
        store.mkdir()
        _wait("the Ray head started", lambda: "--block" in (tmp_path / "head.log").read_text(), 120,
              tmp_path / "head.log")
        cloud = _in(head_ns, [sys.executable, "-m", "cloud.cli", "serve", "--model", str(tiny_dirs["llama"]),
                              "--pki", str(pki), "--store", str(store), "--listen", "127.0.0.1:0", "--port-file",
                              str(port_file), "--threads", "1", "--backbone", "ray", "--ray-address", address,
                              "--ray-workers", "1", "--ray-worker-threads", "1"], tmp_path / "cloud.log")
        procs.append(cloud)
        _wait("the coordinator served", port_file.exists, 240, tmp_path / "cloud.log")

        def workers():
            path = store / "backbone-status.json"
            return json.loads(path.read_text())["workers"] if path.exists() else []

        node = _in(worker_ns, [RAY, "start", "--address", address, "--node-ip-address", f"{subnet}.2",
                               "--num-cpus", "1", "--disable-usage-stats", "--block"], tmp_path / "node.log")
        procs.append(node)
        _wait("a middle worker started on the joining host",
              lambda: len({w["node"] for w in workers() if w["live"]}) == 2, 240, tmp_path / "cloud.log")
        data = tmp_path / "data"
        data.mkdir()
        write_toy_sentiment(data)

        def edge(cloud_address, ns, name, out):
            cmd = [sys.executable, "-m", "edge.cli", "train", "--cloud", cloud_address, "--identity",
                   str(pki / "clients" / name), "--data", str(data / "train.jsonl"), "--steps", "6", "--batch-size",
                   "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "0", "--no-eval-before", "--seed", "1",
                   "--out", str(out), "--threads", "1"]
            return subprocess.Popen(["ip", "netns", "exec", ns, *cmd] if ns else cmd, cwd=REPO, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        runs = [edge(f"127.0.0.1:{port_file.read_text()}", head_ns, n, tmp_path / n) for n in ("alice", "bob")]
        runs.append(edge(tiny_cloud.address, None, "alice", tmp_path / "local"))
        for run in runs:
            _, err = run.communicate(timeout=600)
            assert run.returncode == 0, err[-3000:]
        for name in ("alice", "bob"):  # same seed and data: each equals the in-process middle's run
            assert _losses(tmp_path / name)[-1] == pytest.approx(_losses(tmp_path / "local")[-1], rel=1e-4)
        time.sleep(2.5)
        rows = workers()
        assert sorted(w["active_sessions"] for w in rows) == [1, 1]  # one session on each host's worker
        assert all(w["stats"]["K=2"]["requests"] >= 12 for w in rows)  # 6 forwards + 6 backwards each
    finally:
        for proc in reversed(procs):
            _stop(proc)
        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` leaves its address for `ray.init()`
        if current.exists() and current.read_text().startswith(subnet):
            current.unlink()
