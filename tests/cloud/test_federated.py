"""FedAvg math, and rounds that close on time when a selected client drops out."""

import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from cloud.errors import FailedPrecondition, PermissionDenied
from cloud.owner.federated import FederatedJob, FederatedSettings, fedavg, initial_lora_adapter
from emulator.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, load_adapter_state
from protocol.types import AdapterMeta
from tests.tiny_models import tiny_model


def test_fedavg_is_weighted_by_example_counts():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([[4.0]])}
    out = fedavg([(1, a), (3, b)])
    torch.testing.assert_close(out["w"], torch.tensor([3.25, 6.5]))  # (1*1 + 3*4)/4, (1*2 + 3*8)/4
    torch.testing.assert_close(out["b"], torch.tensor([[3.0]]))
    torch.testing.assert_close(fedavg([(5, a)])["w"], a["w"])


@pytest.mark.parametrize("updates", [[], [(0, {"w": torch.zeros(1)})],
                                     [(1, {"w": torch.zeros(1)}), (1, {"v": torch.zeros(1)})],
                                     [(1, {"w": torch.zeros(1)}), (1, {"w": torch.zeros(2)})]])
def test_fedavg_refuses_empty_unweighted_or_mismatched_updates(updates):
    with pytest.raises(ValueError):
        fedavg(updates)


class FakeRegistry:
    def __init__(self, root):
        self.root, self.adapters, self.grants = root, {}, set()

    def publish(self, directory, number, final):
        adapter_id = f"ad-{number}"
        shutil.copytree(directory, self.root / adapter_id)
        self.adapters[adapter_id] = load_adapter_state(self.root / adapter_id)[0]
        return adapter_id

    def grant(self, adapter_id, identity):
        self.grants.add((adapter_id, identity))


def make_job(tmp_path, rounds, clients, deadline):
    initial = initial_lora_adapter(tiny_model("llama"), 2, LoraSettings(rank=2, alpha=4), "tiny", tmp_path / "init", 0)
    registry = FakeRegistry(tmp_path)
    job = FederatedJob("fed-t", FederatedSettings(rounds, clients, 3, deadline), tmp_path / "work", initial,
                       registry.publish, registry.grant)
    return job, registry, load_adapter_state(initial)[0]


def update(tmp_path, name, base, shift):
    directory = tmp_path / name
    directory.mkdir()
    shutil.copyfile(tmp_path / "init" / ADAPTER_CONFIG, directory / ADAPTER_CONFIG)
    state = {k: v + shift for k, v in base.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    return directory, state


def wait_both(job, after):
    tasks = {}
    threads = [threading.Thread(target=lambda who=who: tasks.__setitem__(who, job.next_round(who, after, 10)))
               for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tasks


def test_a_full_round_averages_by_examples(tmp_path):
    job, registry, base = make_job(tmp_path, rounds=1, clients=2, deadline=30)
    tasks = wait_both(job, 0)
    assert {t.round for t in tasks.values()} == {1} and tasks["alice"].global_adapter_id == "ad-0"
    a_dir, a = update(tmp_path, "a", base, 1.0)
    b_dir, b = update(tmp_path, "b", base, -1.0)
    job.submit("alice", AdapterMeta("offsite", "tiny", job_id="fed-t", round=1, num_examples=30), a_dir)
    assert job.open_round == 1  # still waiting for bob
    job.submit("bob", AdapterMeta("offsite", "tiny", job_id="fed-t", round=1, num_examples=10), b_dir)
    assert job.finished and job.global_id == "ad-1"
    for key, value in registry.adapters["ad-1"].items():
        torch.testing.assert_close(value, (30 * a[key] + 10 * b[key]) / 40)
        torch.testing.assert_close(value, base[key] + 0.5)
    final = job.next_round("bob", 1, 0)
    assert final.finished and final.global_adapter_id == "ad-1"
    assert {("ad-1", "alice"), ("ad-1", "bob")} <= registry.grants


def test_a_round_closes_at_the_deadline_without_the_client_that_dropped(tmp_path):
    job, registry, base = make_job(tmp_path, rounds=2, clients=2, deadline=1.0)
    wait_both(job, 0)
    a_dir, a = update(tmp_path, "a1", base, 2.0)
    job.submit("alice", AdapterMeta("offsite", "tiny", job_id="fed-t", round=1, num_examples=5), a_dir)
    # bob never reports round 1: the round closes at its deadline with alice's update alone.
    task = job.next_round("alice", 1, 10)
    assert task.round == 2 and job.completed == 1
    assert job.history[0]["selected"] == ["alice", "bob"] and job.history[0]["reported"] == ["alice"]
    for key, value in registry.adapters[task.global_adapter_id].items():
        torch.testing.assert_close(value, a[key])
    with pytest.raises(PermissionDenied):  # round 2 opened for alice only (bob is gone)
        job.submit("bob", AdapterMeta("offsite", "tiny", job_id="fed-t", round=2, num_examples=5), a_dir)
    with pytest.raises(FailedPrecondition, match="round 1 .* is not open"):
        job.submit("alice", AdapterMeta("offsite", "tiny", job_id="fed-t", round=1, num_examples=5), a_dir)
    a2_dir, a2 = update(tmp_path, "a2", base, 3.0)
    job.submit("alice", AdapterMeta("offsite", "tiny", job_id="fed-t", round=2, num_examples=5), a2_dir)
    assert job.finished and ("ad-2", "bob") in registry.grants  # the final adapter is pullable by every participant
    for key, value in registry.adapters["ad-2"].items():
        torch.testing.assert_close(value, a2[key])
