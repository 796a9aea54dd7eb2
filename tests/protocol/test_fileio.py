"""The one atomic-write module: directories published whole, checkpoints replaced crash-safely."""

import os

import pytest

from protocol.fileio import publish_directory, recover_directory, replace_directory


def test_publish_writes_whole_and_first_writer_wins(tmp_path):
    def fill(text):
        def write(tmp):
            (tmp / "a.txt").write_text(text)
            return tmp_path / "out"
        return write

    assert publish_directory(tmp_path, fill("first")) == tmp_path / "out"
    publish_directory(tmp_path, fill("second"))  # the target exists: the first copy is kept
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left


def test_a_failing_fill_leaves_nothing(tmp_path):
    def fill(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_directory(tmp_path, fill)
    with pytest.raises(RuntimeError, match="disk full"):
        replace_directory(tmp_path / "ckpt", fill)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["ckpt.new"])
    assert not (tmp_path / "ckpt").exists()


def _write(text):
    return lambda tmp: (tmp / "v").write_text(text)


def test_replace_and_recover_at_each_crash_point(tmp_path):
    target = tmp_path / "ckpt"
    replace_directory(target, _write("1"))
    replace_directory(target, _write("2"))
    assert (target / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    # crash after the old one went aside, before the new one came in: the complete new one wins
    new, old = tmp_path / "ckpt.new", tmp_path / "ckpt.old"
    new.mkdir()
    (new / "v").write_text("3")
    os.rename(target, old)
    recover_directory(target)
    assert (target / "v").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    # crash while the new one was still being written: it is dropped, the old one stays
    new.mkdir()
    (new / "v").write_text("half")
    recover_directory(target)
    assert (target / "v").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    # only the old one left (the new one lost): it is put back
    os.rename(target, old)
    recover_directory(target)
    assert (target / "v").read_text() == "3"
