import json
import subprocess
import sys

import pytest

from emulator.data.datasets import IGNORE, DataError, load_eval, load_train, train_batches
from tests.conftest import REPO
from tests.tiny_models import tiny_tokenizer

TOK = tiny_tokenizer()


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_completion_labels_and_truncation(tmp_path):
    path = write(tmp_path, "t.jsonl", [{"prompt": "abcdefghij", "completion": "xy"}, {"text": "hello"}])
    data = load_train(path, TOK, seq_len=8)
    first, second = data.examples
    assert len(first.input_ids) == 8 and first.input_ids[-2:] == TOK("xy").input_ids
    assert first.input_ids[:6] == TOK("efghij").input_ids  # truncated from the left of the prompt
    assert first.labels[:6] == [IGNORE] * 6 and first.labels[-2:] == first.input_ids[-2:]
    assert second.labels == second.input_ids
    assert data.truncated == 1


@pytest.mark.parametrize("rows, message", [
    (["{not json"], "t.jsonl:1: malformed JSON"),
    ([{"prompt": "a"}], "t.jsonl:1: missing field 'completion'"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "b"}],
     "t.jsonl:2: field 'prompt' must be a string"),
    ([{"prompt": "a", "completion": "x" * 20}], "t.jsonl:1: completion of 20 tokens is longer than the context"),
    ([], "t.jsonl: file is empty"),
])
def test_bad_training_rows(tmp_path, rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_train(write(tmp_path, "t.jsonl", rows), TOK, seq_len=8)


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "choices": ["x", "y"], "answer": 2}, "answer 2 out of range 0..1"),
    ({"prompt": "a", "choices": ["x"], "answer": 0}, "at least 2 strings"),
    ({"prompt": "a", "choices": ["x", "y"]}, "answer None out of range"),
])
def test_bad_eval_rows(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_eval(write(tmp_path, "e.jsonl", [row]), TOK, seq_len=8)


def test_eval_single_token_choices_share_one_sequence(tmp_path):
    path = write(tmp_path, "e.jsonl", [{"prompt": "abc", "choices": ["x", "y"], "answer": 1},
                                       {"prompt": "abc", "choices": ["xy", "z"], "answer": 0}])
    one, two = load_eval(path, TOK, seq_len=8).examples
    assert len(one.sequences) == 1 and one.targets == [[(0, 2, TOK("x").input_ids[0])], [(0, 2, TOK("y").input_ids[0])]]
    assert len(two.sequences) == 2 and len(two.targets[0]) == 2


def test_batches_are_right_padded(tmp_path):
    path = write(tmp_path, "t.jsonl", [{"prompt": "a" * n, "completion": "b"} for n in range(1, 6)])
    ids, labels = next(train_batches(load_train(path, TOK, 16), 4, pad_id=0, seed=0))
    assert ids.shape == labels.shape and ids.shape[0] == 4
    for row_ids, row_labels in zip(ids, labels):
        n = int((row_ids != 0).sum())
        assert (row_ids[n:] == 0).all() and (row_labels[n:] == IGNORE).all()


def test_cli_reports_bad_data_in_one_line(tmp_path):
    bad = write(tmp_path, "bad.jsonl", ['{"prompt": "x", "completion": 1}'])
    (tmp_path / "id").mkdir()
    proc = subprocess.run([sys.executable, "-m", "edge.cli", "train", "--cloud", "127.0.0.1:1", "--identity",
                           str(tmp_path / "id"), "--data", str(bad), "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"edgetune-edge: error: {bad}:1: field 'completion' must be a string"]
