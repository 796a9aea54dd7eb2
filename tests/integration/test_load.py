"""Load: 8 edge clients train concurrently against one coordinator, each for a fixed number of
steps; every client ends with exactly the adapter it would get alone (no cross-talk)."""

import json
import statistics
import threading
import time

import pytest
import torch

from edge.modes.split import LocalMiddle, RemoteMiddle, split_step
from edge.rpc.client import CloudClient
from emulator.adapters.lora import LoraSettings, add_lora, lora_parameters
from emulator.model.bundle import load_edge_model
from emulator.model.loading import load_causal_lm
from emulator.model.segments import extract_middle, plan_for
from protocol.accounting import Traffic
from protocol.channel import secure_channel
from protocol.pki import issue_client
from tests.edge.test_split_equivalence import make_batch

pytestmark = pytest.mark.integration
CLIENTS, STEPS = 8, 25


def train(model, link, seed, times=None):
    g = torch.Generator().manual_seed(seed)  # torch's global RNG is shared by the client threads
    with torch.no_grad():
        for p in lora_parameters(model).values():  # distinct weights per client make cross-talk visible
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = list(lora_parameters(model).values())
    # Plain SGD: updates are linear in the gradients, so float rounding differences between the
    # server's threads and the reference stay at rounding size (Adam would amplify them near zero).
    optimizer = torch.optim.SGD(params, lr=0.1)
    for step in range(1, STEPS + 1):
        start = time.perf_counter()
        split_step(model, link, step, *make_batch(seed=seed * 100 + step), Traffic())
        optimizer.step()
        optimizer.zero_grad()
        if times is not None:
            times.append(time.perf_counter() - start)
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


def test_eight_concurrent_clients(tiny_cloud, pki, tiny_dirs, tmp_path):
    full = load_causal_lm(tiny_dirs["llama"])
    settings = LoraSettings(rank=4, alpha=8)
    results, times, errors = {}, {}, []

    def client(i):
        name = f"load{i}"
        try:
            with secure_channel(tiny_cloud.address, pki / "clients" / name) as channel:
                c = CloudClient(channel)
                info = c.open_session("split", 2)
                edge = load_edge_model(c.bundle(info))
                stream = c.train_stream(info)
                times[name] = []
                results[name] = train(add_lora(edge, settings, edge.bottom.spec), RemoteMiddle(stream), i,
                                      times[name])
                stream.close()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append((name, err))

    for i in range(CLIENTS):
        if not (pki / "clients" / f"load{i}").exists():
            issue_client(pki, f"load{i}")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - started
    assert not errors, errors
    local = LocalMiddle(extract_middle(full, plan_for(full.config, 2)))
    bundle = next(iter((tiny_cloud.store / "bundles").iterdir()))
    for i in range(CLIENTS):
        edge = load_edge_model(bundle)
        expected = train(add_lora(edge, settings, edge.bottom.spec), local, i)
        for name, value in expected.items():
            torch.testing.assert_close(results[f"load{i}"][name], value, rtol=1e-5, atol=1e-6)
    report = {name: {"p50_s": statistics.median(t), "p99_s": sorted(t)[min(len(t) - 1, int(0.99 * len(t)))],
                     "steps": len(t)} for name, t in times.items()}
    report["_all"] = {"clients": CLIENTS, "steps_each": STEPS, "wall_s": wall}
    (tmp_path / "load_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
