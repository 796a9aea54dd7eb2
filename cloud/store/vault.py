"""Artifacts at rest: AES-256-GCM encrypted, authenticated files written atomically.

The key lives in ``store/store.key`` (created on first use, mode 0600). Each file is
``nonce (12 bytes) || ciphertext || tag``, with the artifact's logical name as associated data, so a
file that is tampered with, truncated, or moved to another adapter's name fails to open.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.fileio import atomic_write

NONCE_BYTES = 12
KEY_FILE = "store.key"


class CorruptArtifactError(Exception):
    """A stored artifact failed authentication: tampered with, truncated or misplaced."""


class Vault:
    """Encrypts and decrypts the store's artifacts with the store's key."""

    def __init__(self, store: Path) -> None:
        key_path = store / KEY_FILE
        if not key_path.exists():
            store.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(AESGCM.generate_key(bit_length=256))
                f.flush()
                os.fsync(f.fileno())
        if key_path.stat().st_mode & 0o077:
            raise PermissionError(f"{key_path} is readable by others; run `chmod 600 {key_path}`")
        self._aead = AESGCM(key_path.read_bytes())

    def seal(self, path: Path, data: bytes, name: str) -> None:
        nonce = os.urandom(NONCE_BYTES)
        atomic_write(path, nonce + self._aead.encrypt(nonce, data, name.encode()))

    def open(self, path: Path, name: str) -> bytes:
        blob = path.read_bytes()
        if len(blob) < NONCE_BYTES + 16:
            raise CorruptArtifactError(f"{path}: truncated ({len(blob)} bytes); the artifact cannot be used")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], name.encode())
        except InvalidTag:
            raise CorruptArtifactError(f"{path}: failed authentication (tampered with or corrupted); "
                                       "the artifact cannot be used") from None
