"""Tensor and file (de)serialization into size-bounded chunks.

A tensor crosses the wire as raw little-endian bytes in a wire dtype, cut into chunks of at most
``CHUNK_BYTES`` so that no single gRPC message approaches the message-size limit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from protocol.serde import WireFormatError
from protocol.types import FileChunk, TensorChunk

CHUNK_BYTES = 1 << 20  # 1 MiB of payload per message

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def element_size(dtype_name: str) -> int:
    """Bytes per element of a wire dtype."""
    return torch.empty((), dtype=_dtype(dtype_name)).element_size()


def tensor_chunks(name: str, tensor: torch.Tensor, wire_dtype: str = "float32",
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[TensorChunk]:
    """Cuts ``tensor`` (any shape) into chunks of its bytes in ``wire_dtype``."""
    data = tensor.detach().to(_dtype(wire_dtype)).contiguous().view(torch.uint8).numpy().tobytes()
    shape = tuple(tensor.shape)
    total = len(data)
    for offset in range(0, max(total, 1), chunk_bytes):
        yield TensorChunk(name, wire_dtype, shape, total, offset, data[offset:offset + chunk_bytes])


class TensorAssembler:
    """Collects the chunks of one tensor at a time and returns the tensor when it is complete."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._head: TensorChunk | None = None
        self._buf = bytearray()
        self._max_bytes = max_bytes

    def feed(self, chunk: TensorChunk) -> torch.Tensor | None:
        """Adds one chunk; returns the float32 tensor once its last chunk has arrived.

        Raises:
            WireFormatError: a chunk out of order, a size that disagrees with the shape, or a tensor
                over ``max_bytes``.
        """
        if self._head is None:
            self._start(chunk)
        elif chunk.name != self._head.name or chunk.offset != len(self._buf):
            raise WireFormatError(f"chunk of {chunk.name!r} at offset {chunk.offset} is out of order")
        self._buf += chunk.data
        if len(self._buf) > self._head.total_bytes:  # type: ignore[union-attr]
            raise WireFormatError(f"tensor {chunk.name!r} has more bytes than announced")
        if len(self._buf) < self._head.total_bytes:  # type: ignore[union-attr]
            return None
        head, data = self._head, bytes(self._buf)
        self._head, self._buf = None, bytearray()
        return tensor_from_bytes(head.dtype, head.shape, data)  # type: ignore[union-attr]

    def _start(self, chunk: TensorChunk) -> None:
        if chunk.offset != 0:
            raise WireFormatError(f"tensor {chunk.name!r} starts at offset {chunk.offset}, not 0")
        if self._max_bytes is not None and chunk.total_bytes > self._max_bytes:
            raise WireFormatError(f"tensor {chunk.name!r} of {chunk.total_bytes} bytes exceeds the "
                                  f"limit of {self._max_bytes}")
        self._head = chunk


def tensor_from_bytes(dtype_name: str, shape: Iterable[int], data: bytes) -> torch.Tensor:
    """Rebuilds a float32 tensor from wire bytes, checking the size against the shape."""
    dtype, shape = _dtype(dtype_name), tuple(shape)
    if any(d < 0 for d in shape):
        raise WireFormatError(f"negative dimension in shape {shape}")
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * element_size(dtype_name)
    if len(data) != expected:
        raise WireFormatError(f"{len(data)} bytes do not fill shape {shape} of {dtype_name} ({expected})")
    if numel == 0:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).to(torch.float32)


def file_chunks(path: Path, name: str | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator[FileChunk]:
    """Streams a file; the last chunk carries the SHA-256 of the whole file."""
    return bytes_chunks(name or path.name, path.read_bytes(), chunk_bytes)


def bytes_chunks(name: str, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[FileChunk]:
    """Streams in-memory file contents like :func:`file_chunks`."""
    total, digest = len(data), hashlib.sha256(data).hexdigest()
    for offset in range(0, max(total, 1), chunk_bytes):
        piece = data[offset:offset + chunk_bytes]
        last = offset + chunk_bytes >= total
        yield FileChunk(name, total, offset, piece, digest if last else "")


def receive_files(chunks: Iterable[FileChunk], directory: Path, allowed: set[str] | None = None) -> list[str]:
    """Writes streamed files into ``directory``, verifying each file's size and SHA-256.

    Raises:
        WireFormatError: a name outside ``allowed``, a path-like name, or a corrupted file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    buffers: dict[str, bytearray] = {}
    done: list[str] = []
    for chunk in chunks:
        if "/" in chunk.name or "\\" in chunk.name or chunk.name in ("", ".", ".."):
            raise WireFormatError(f"refusing file name {chunk.name!r}")
        if allowed is not None and chunk.name not in allowed:
            raise WireFormatError(f"unexpected file {chunk.name!r}")
        buf = buffers.setdefault(chunk.name, bytearray())
        if chunk.offset != len(buf):
            raise WireFormatError(f"file {chunk.name!r}: chunk at {chunk.offset} is out of order")
        buf += chunk.data
        if chunk.sha256:
            if len(buf) != chunk.total_bytes or hashlib.sha256(buf).hexdigest() != chunk.sha256:
                raise WireFormatError(f"file {chunk.name!r} arrived corrupted (size or SHA-256 mismatch)")
            (directory / chunk.name).write_bytes(bytes(buf))
            done.append(chunk.name)
            del buffers[chunk.name]
    if buffers:
        raise WireFormatError(f"stream ended before {sorted(buffers)} were complete")
    return done


def _dtype(name: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise WireFormatError(f"unknown wire dtype {name!r} (known: {', '.join(WIRE_DTYPES)})") from None
