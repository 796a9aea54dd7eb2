"""`make demo` reuses an earlier run's zero-shot accuracies only for the same model, rows, settings and code."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from deploy import demo


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A stand-in repository (one source file), model fingerprint and client directory."""
    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "scoring.py").write_text("SCORE = 1\n")
    (tmp_path / "client0").mkdir()
    (tmp_path / "client0" / "eval.jsonl").write_text('{"prompt": "p", "choices": ["a", "b"], "answer": 0}\n')
    monkeypatch.setattr(demo, "REPO", tmp_path)
    monkeypatch.setattr(demo, "CODE", ("edge",))
    monkeypatch.setattr(demo, "resolve_model", lambda name: tmp_path)
    fingerprint = {"value": "model-a"}
    monkeypatch.setattr(demo, "model_fingerprint", lambda path: fingerprint["value"])
    return tmp_path, fingerprint


def test_the_key_follows_model_rows_settings_and_code(tree, monkeypatch):
    root, fingerprint = tree
    args = Namespace(threads=2)
    key = demo.baseline_key(root / "client0", args)
    assert demo.baseline_key(root / "client0", args) == key  # deterministic

    changed = []
    fingerprint["value"] = "model-b"
    changed.append(demo.baseline_key(root / "client0", args))
    fingerprint["value"] = "model-a"
    (root / "client0" / "eval.jsonl").write_text('{"prompt": "q", "choices": ["a", "b"], "answer": 1}\n')
    changed.append(demo.baseline_key(root / "client0", args))
    (root / "client0" / "eval.jsonl").write_text('{"prompt": "p", "choices": ["a", "b"], "answer": 0}\n')
    (root / "edge" / "scoring.py").write_text("SCORE = 2\n")
    changed.append(demo.baseline_key(root / "client0", args))
    (root / "edge" / "scoring.py").write_text("SCORE = 1\n")
    changed.append(demo.baseline_key(root / "client0", Namespace(threads=1)))
    monkeypatch.setattr(demo, "BACKBONE_DTYPE", "float32")
    changed.append(demo.baseline_key(root / "client0", args))
    assert key not in changed and len(set(changed)) == len(changed)


def test_only_the_current_key_is_kept_and_damage_means_measure(tmp_path):
    cache = tmp_path / "store" / "baselines.json"
    assert demo.cached_baselines(cache, "k1") == {}  # nothing yet
    demo.store_baselines(cache, "k1", {"split": 0.756})
    demo.store_baselines(cache, "k1", {"offsite": 0.532})
    assert demo.cached_baselines(cache, "k1") == {"split": 0.756, "offsite": 0.532}
    assert demo.cached_baselines(cache, "k2") == {}  # another model, rows, settings or code
    demo.store_baselines(cache, "k2", {"split": 0.7})
    assert json.loads(cache.read_text()) == {"k2": {"split": 0.7}}
    cache.write_text("{not json")
    assert demo.cached_baselines(cache, "k2") == {}
    cache.write_text('{"k2": {"split": 0.7, "dlora+KR": 0.1}}')  # only the runs whose before is a zero-shot
    assert demo.cached_baselines(cache, "k2") == {"split": 0.7}
