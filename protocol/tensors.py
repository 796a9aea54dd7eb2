"""Tensor and file (de)serialization into size-bounded chunks.

A tensor crosses the wire as raw little-endian bytes in a wire dtype, cut into chunks of at most
``CHUNK_BYTES`` so that no single gRPC message approaches the message-size limit.

``int8`` is a codec rather than a cast: per row of the last dimension (one token's hidden vector)
it sends one float32 scale ``absmax / 127`` followed by the rounded int8 values, so every element
comes back within ``absmax_row / 254`` of what was sent (see docs/dlora.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from protocol.ndarrays import checked_wire_shape
from protocol.serde import WireFormatError
from protocol.types import FileChunk, TensorChunk

CHUNK_BYTES = 1 << 20  # 1 MiB of payload per message

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,  # with one float32 scale per row, see the module docstring
}
WIRE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SCALE_BYTES = 4  # one float32 scale per int8 row


def wire_dtype_name(name: str) -> str:
    """The canonical wire dtype for a short (``fp32``, ``bf16``, ``fp16``) or long name."""
    canonical = WIRE_ALIASES.get(name, name)
    if canonical not in WIRE_DTYPES:
        known = ", ".join([*WIRE_ALIASES, *WIRE_DTYPES])
        raise WireFormatError(f"unknown wire dtype {name!r} (known: {known})")
    return canonical


def element_size(dtype_name: str) -> int:
    """Bytes per element of a wire dtype (int8: 1, scales excluded; see :func:`wire_nbytes`)."""
    return torch.empty((), dtype=_dtype(dtype_name)).element_size()


def wire_nbytes(dtype_name: str, shape: Iterable[int]) -> int:
    """Payload bytes of a tensor of ``shape`` in a wire dtype, int8 scales included."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if _dtype(dtype_name) is not torch.int8:
        return numel * element_size(dtype_name)
    return numel + _rows(shape) * SCALE_BYTES


def encode_tensor(tensor: torch.Tensor, wire_dtype: str) -> bytes:
    """The wire bytes of ``tensor`` in ``wire_dtype`` (little-endian, row-major)."""
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return b""
    if _dtype(wire_dtype) is not torch.int8:
        return _raw(tensor.to(_dtype(wire_dtype)))
    rows = tensor.float().reshape(_rows(tuple(tensor.shape)), -1)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (rows / safe).round().clamp(-127, 127).to(torch.int8)
    return _raw(scale) + _raw(quantized)


def tensor_chunks(name: str, tensor: torch.Tensor, wire_dtype: str = "float32",
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[TensorChunk]:
    """Cuts ``tensor`` (any shape) into chunks of its bytes in ``wire_dtype``."""
    wire_dtype = wire_dtype_name(wire_dtype)
    data = encode_tensor(tensor, wire_dtype)
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
    dtype_name, shape = checked_wire_shape(dtype_name, shape, data)
    dtype = _dtype(dtype_name)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.float32)
    if dtype is not torch.int8:
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).to(torch.float32)
    n_scales = _rows(shape) * SCALE_BYTES
    scale = torch.frombuffer(bytearray(data[:n_scales]), dtype=torch.float32).reshape(-1, 1)
    values = torch.frombuffer(bytearray(data[n_scales:]), dtype=torch.int8).reshape(scale.shape[0], -1)
    return (values.to(torch.float32) * scale).reshape(shape)


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


def _rows(shape: tuple[int, ...]) -> int:
    """Rows of the int8 codec: one per vector along the last dimension (a scalar is one row)."""
    return math.prod(shape[:-1]) if shape and shape[-1] else (1 if not shape else 0)


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
