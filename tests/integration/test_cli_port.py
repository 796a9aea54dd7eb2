"""``serve`` owns its port: a second coordinator on a port another process listens on is refused."""

import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, start_cloud, stop_cloud

pytestmark = pytest.mark.integration


def serve_on(listen, pki, store, model):
    return subprocess.run([sys.executable, "-m", "cloud.cli", "serve", "--model", model, "--pki", str(pki),
                           "--listen", listen, "--store", str(store), "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_second_coordinator_on_the_same_port_is_refused(tiny_dirs, pki, tmp_path):
    first = start_cloud(str(tiny_dirs["llama"]), pki, tmp_path / "store-a")
    try:
        second = serve_on(first.address, pki, tmp_path / "store-b", str(tiny_dirs["llama"]))
        assert first.process.poll() is None  # the first one keeps serving
    finally:
        stop_cloud(first)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"--listen {first.address}" in lines[0] and "another process already listens on this port" in lines[0]
    assert "serving" not in second.stdout


def test_port_held_by_a_plain_socket_is_refused(tiny_dirs, pki, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = serve_on(f"127.0.0.1:{port}", pki, tmp_path / "store", str(tiny_dirs["llama"]))
    assert proc.returncode == 2 and "another process already listens on this port" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
