"""Emulator distillation: the loss is what the docstring says, it goes down, and runs resume exactly."""

import pytest
import torch

from emulator.model.segments import split_causal_lm
from emulator.offsite.compress import layer_drop
from emulator.offsite.corpus import CorpusError, file_texts, held_out_split, load_texts, speech_texts, token_chunks
from emulator.offsite.distill import DistillSettings, distill, evaluate_kd, kd_loss
from tests.tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def chunks():
    return token_chunks(speech_texts()[:120], tiny_tokenizer(), 24)


@pytest.fixture(scope="module")
def split():
    return split_causal_lm(tiny_model("llama", layers=8), 1)


def test_kd_loss_of_the_middle_itself_is_the_models_lm_loss(split, chunks):
    model = tiny_model("llama", layers=8)
    ids = chunks[:4]
    total, parts = kd_loss(split.edge, split.middle, split.middle, ids, hidden_weight=3.0)
    with torch.no_grad():
        reference = model(ids, labels=ids).loss.item()
    assert parts.hidden == pytest.approx(0.0, abs=1e-12)
    assert parts.ce == pytest.approx(reference, rel=1e-5)
    assert total.item() == pytest.approx(reference, rel=1e-5)


def test_kd_hidden_term_is_the_rms_normalised_mse(split, chunks):
    ids = chunks[:2]
    student = layer_drop(split.middle, 2)
    _, parts = kd_loss(split.edge, split.middle, student, ids, hidden_weight=0.5)
    with torch.no_grad():
        h = split.edge.bottom(ids)
        t, s = split.middle(h), student(h)
        rms = torch.sqrt((t ** 2).mean(-1, keepdim=True))
        expected = (((t - s) / rms) ** 2).mean().item()
    assert parts.hidden == pytest.approx(expected, rel=1e-5)
    assert parts.total == pytest.approx(parts.ce + 0.5 * expected, rel=1e-5)


def test_distillation_lowers_the_held_out_kd_loss_and_leaves_inputs_alone(split, chunks):
    train, held = held_out_split(chunks, 0.1)
    student = layer_drop(split.middle, 2)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    settings = DistillSettings(steps=40, lr=3e-3, batch_size=8, seq_len=24, warmup_steps=2)
    before = evaluate_kd(split.edge, split.middle, student, held, settings.hidden_weight)
    result = distill(split.edge, split.middle, student, train, settings, progress=False)
    after = evaluate_kd(split.edge, split.middle, result.student, held, settings.hidden_weight)
    # A random tiny model's CE sits near log(vocab) either way; the hidden term is what distillation fixes.
    assert after.total < before.total - 0.1
    assert after.hidden < 0.5 * before.hidden
    assert all(torch.equal(original[k], v) for k, v in student.state_dict().items())
    assert len(result.history) == 40 and result.start_step == 0


def test_an_interrupted_distillation_resumes_to_the_same_weights(split, chunks, tmp_path):
    student = layer_drop(split.middle, 2)
    settings = DistillSettings(steps=6, lr=1e-3, batch_size=4, seq_len=24, warmup_steps=2)
    straight = distill(split.edge, split.middle, student, chunks, settings, progress=False)
    ckpt = tmp_path / "ckpt"
    distill(split.edge, split.middle, student, chunks, settings, ckpt, checkpoint_every=2, stop_after=3,
            progress=False)
    resumed = distill(split.edge, split.middle, student, chunks, settings, ckpt, checkpoint_every=2,
                      progress=False)
    assert resumed.start_step == 3
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_other_settings_is_refused(split, chunks, tmp_path):
    student = layer_drop(split.middle, 2)
    settings = DistillSettings(steps=2, batch_size=2, seq_len=24, warmup_steps=1)
    distill(split.edge, split.middle, student, chunks, settings, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="other distillation settings"):
        distill(split.edge, split.middle, student, chunks, DistillSettings(steps=3, batch_size=2, seq_len=24),
                tmp_path / "c", progress=False)


def test_sampled_and_file_corpora(tmp_path):
    texts = load_texts("sampled", tiny_model("llama"), tiny_tokenizer(), sample_count=3, sample_length=12)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    (tmp_path / "c.jsonl").write_text('{"text": "the cloud owns this passage of text"}\n')
    assert file_texts(tmp_path / "c.jsonl") == ["the cloud owns this passage of text"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:1"):
        file_texts(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match="fewer than one"):
        token_chunks(["short"], tiny_tokenizer(), 64)


_KILLED_MID_SAVE = r"""
import os, sys
import torch
from emulator.model.segments import split_causal_lm
from emulator.offsite.compress import layer_drop
from emulator.offsite.corpus import speech_texts, token_chunks
from emulator.offsite.distill import DistillSettings, distill
from tests.tiny_models import tiny_model, tiny_tokenizer

ckpt = sys.argv[1]
real_rename = os.rename

def rename(src, dst, *args, **kwargs):
    # The kill: the step-4 checkpoint is complete, the step-2 one is out of the way, and the process
    # dies before the new one is renamed in.
    if os.fspath(dst) == ckpt and os.path.exists(os.path.join(ckpt + ".new", "state.json")) and \
            '"step": 4' in open(os.path.join(ckpt + ".new", "state.json")).read():
        os._exit(17)
    return real_rename(src, dst, *args, **kwargs)

os.rename = rename
split = split_causal_lm(tiny_model("llama", layers=8), 1)
chunks = token_chunks(speech_texts()[:120], tiny_tokenizer(), 24)
settings = DistillSettings(steps=6, lr=1e-3, batch_size=4, seq_len=24, warmup_steps=2)
distill(split.edge, split.middle, layer_drop(split.middle, 2), chunks, settings, __import__("pathlib").Path(ckpt),
        checkpoint_every=2, progress=False)
"""


def test_a_process_killed_between_the_checkpoint_renames_resumes_from_a_checkpoint(split, chunks, tmp_path):
    """The process dies after the old checkpoint is moved aside and before the new one is renamed in."""
    import subprocess
    import sys
    from pathlib import Path

    ckpt = tmp_path / "ckpt"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(ckpt)], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 17, done.stderr[-2000:]  # it really died mid-save
    assert not ckpt.exists()  # ... between the two renames
    student = layer_drop(split.middle, 2)
    settings = DistillSettings(steps=6, lr=1e-3, batch_size=4, seq_len=24, warmup_steps=2)
    resumed = distill(split.edge, split.middle, student, chunks, settings, ckpt, checkpoint_every=2,
                      progress=False)
    assert resumed.start_step == 4  # the complete step-4 checkpoint was rolled forward, nothing was lost
    straight = distill(split.edge, split.middle, student, chunks, settings, progress=False)
    for (name, a), b in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
