import pytest
import torch
from transformers import get_scheduler

from edge.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def setup(seed):
    torch.manual_seed(seed)
    params = {"a": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.randn(3))}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    return params, opt, sched


def run_steps(params, opt, sched, steps, start=0):
    for i in range(start, start + steps):
        torch.manual_seed(100 + i)
        loss = sum((p * torch.randn_like(p)).sum() ** 2 for p in params.values())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_resume_is_bit_identical(tmp_path):
    ref = setup(0)
    run_steps(*ref, 6)
    params, opt, sched = setup(0)
    run_steps(params, opt, sched, 3)
    save_checkpoint(tmp_path, params, opt, sched, Checkpoint(step=3, settings={"lr": 1e-2}, records=[{"x": 1}]))
    fresh = setup(1)  # different weights: everything must come from the checkpoint
    state = load_checkpoint(tmp_path, *fresh, settings={"lr": 1e-2})
    assert state.step == 3 and state.records == [{"x": 1}]
    run_steps(*fresh, 3, start=3)
    for name in ref[0]:
        assert torch.equal(ref[0][name], fresh[0][name])


def test_mismatched_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, *setup(0), settings={})
    params, opt, sched = setup(0)
    save_checkpoint(tmp_path, params, opt, sched, Checkpoint(step=1, settings={"lr": 1e-2, "seed": 1}))
    with pytest.raises(CheckpointError, match="other settings \\(lr\\)"):
        load_checkpoint(tmp_path, *setup(0), settings={"lr": 1e-3, "seed": 1})
