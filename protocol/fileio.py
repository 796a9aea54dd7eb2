"""Crash-safe file writes shared by both roles: temp file, fsync, rename, directory fsync.

A crash at any point leaves either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_files(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def publish_directory(parent: Path, fill: Callable[[Path], Path]) -> Path:
    """Writes a directory all at once, first writer wins (content-addressed or cached outputs).

    ``fill(tmp)`` writes into a private directory under ``parent`` and returns the final path; the
    directory is renamed there unless that path exists already (another writer won the race: its
    copy is kept). A failure in ``fill`` leaves nothing behind.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        target = fill(tmp)
        if not target.exists():
            _fsync_files(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not a lost race: a real failure
                    raise
            fsync_dir(target.parent)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _aside(target: Path, suffix: str) -> Path:
    return target.with_name(f"{target.name}.{suffix}")


def replace_directory(target: Path, fill: Callable[[Path], object]) -> Path:
    """Replaces directory ``target`` with a new one, crash-safe (checkpoints).

    ``fill`` writes ``<target>.new`` completely (fsynced); then the old directory is renamed aside
    to ``<target>.old``, the new one renamed in, and the old one deleted. A crash at any point
    leaves a complete directory that :func:`recover_directory` puts back under ``target``.
    """
    recover_directory(target)
    new, old = _aside(target, "new"), _aside(target, "old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    fill(new)
    _fsync_files(new)
    fsync_dir(new.parent)
    if target.exists():
        os.rename(target, old)  # step 1: the old one aside
    os.rename(new, target)  # step 2: the new one in
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover_directory(target: Path) -> None:
    """Completes or undoes a :func:`replace_directory` that a crash interrupted.

    Between its two renames ``target`` is missing: the complete ``.new`` is renamed in (or, without
    it, the ``.old`` is put back). A ``.new`` left before the first rename is unfinished and dropped.
    """
    new, old = _aside(target, "new"), _aside(target, "old")
    if not target.exists() and old.is_dir():
        os.rename(new if new.is_dir() else old, target)
        fsync_dir(target.parent)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(new, ignore_errors=True)
