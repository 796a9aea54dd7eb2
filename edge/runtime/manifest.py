"""The export directory's ``manifest.json``: what was exported, from which adapter, and every file's SHA-256.

Torch-free: the prediction path reads and verifies a manifest with nothing but the standard library.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "edgetune-onnx-export"
VERSION = 1
BOTTOM, TOP, TOKENIZER = "bottom.onnx", "top.onnx", "tokenizer.json"


class ExportError(ValueError):
    """A missing, damaged or mismatched export; ``str(err)`` is one line naming the input and the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in ``directory`` except the manifest, by name."""
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(directory: Path, manifest: dict) -> Path:
    """Adds the ``files`` hashes to ``manifest`` and writes it into ``directory``."""
    manifest = {**manifest, "files": file_hashes(directory)}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> dict:
    """Reads and verifies an export: the manifest parses, every listed file exists and its hash matches.

    Raises:
        ExportError: naming the file and what to do.
    """
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ExportError(f"--model {directory}: no such directory; run `edgetune-edge export --adapter DIR "
                          f"--out {directory}` first")
    if not path.is_file():
        raise ExportError(f"{path}: missing; --model must be a directory written by `edgetune-edge export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not an edgetune ONNX export manifest; export again")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{path}: manifest version {manifest.get('version')!r}, this edgetune reads "
                          f"{VERSION}; export again with this version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {BOTTOM, TOP, TOKENIZER} <= set(files):
        raise ExportError(f"{path}: lists no {BOTTOM}, {TOP} and {TOKENIZER}; export again")
    for name, expected in files.items():
        file = directory / name
        if "/" in name or not file.is_file():
            raise ExportError(f"{file}: missing from the export; export again or copy the whole directory")
        if sha256_file(file) != expected:
            raise ExportError(f"{file}: SHA-256 does not match {MANIFEST} (damaged or edited); export again")
    return manifest


def check_base_model(manifest: dict, model_name: str, model_type: str, num_blocks: int, hidden_size: int,
                     where: str) -> None:
    """Checks that the cloud at ``where`` serves the base model the export was made from.

    Raises:
        ExportError: naming both models.
    """
    base = manifest["base_model"]
    ours = (base["name"], base["model_type"], base["num_blocks"], base["hidden_size"])
    theirs = (model_name, model_type, num_blocks, hidden_size)
    if ours != theirs:
        raise ExportError(f"the export was made for base model {ours[0]!r} ({ours[1]}, {ours[2]} blocks, hidden "
                          f"{ours[3]}) but the cloud at {where} serves {theirs[0]!r} ({theirs[1]}, {theirs[2]} "
                          f"blocks, hidden {theirs[3]}); use that cloud or export an adapter trained on its model")
