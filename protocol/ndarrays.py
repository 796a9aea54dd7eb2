"""The tensor wire format of :mod:`protocol.tensors` for numpy arrays, without importing torch.

An edge that runs its segments on onnxruntime has numpy arrays, not tensors. These functions write
and read exactly the bytes :func:`protocol.tensors.encode_tensor` and
:func:`protocol.tensors.tensor_from_bytes` do (little-endian, row-major; ``bfloat16`` rounded to
nearest even; ``int8`` with one float32 ``absmax / 127`` scale per row), so the cloud cannot tell
which runtime an edge uses. A test compares the bytes of both modules for every wire dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from protocol.serde import WireFormatError
from protocol.types import TensorChunk

CHUNK_BYTES = 1 << 20  # as protocol.tensors.CHUNK_BYTES
SCALE_BYTES = 4
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def wire_dtype_name(name: str) -> str:
    """The canonical wire dtype of a short or long name (as :func:`protocol.tensors.wire_dtype_name`)."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _ITEMSIZE:
        raise WireFormatError(f"unknown wire dtype {name!r} (known: {', '.join([*_ALIASES, *_ITEMSIZE])})")
    return canonical


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if shape and shape[-1] else (1 if not shape else 0)


def wire_nbytes(dtype_name: str, shape: Iterable[int]) -> int:
    """Payload bytes of an array of ``shape`` in a wire dtype, int8 scales included."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if dtype_name != "int8":
        return numel * _ITEMSIZE[dtype_name]
    return numel + _rows(shape) * SCALE_BYTES


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits of bfloat16, rounded to nearest even (NaN stays NaN)."""
    bits = values.astype("<f4").view("<u4")
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    rounded = np.where(np.isnan(values), np.uint32(0x7FC0), rounded)
    return rounded.astype("<u2")


def encode_array(array: np.ndarray, wire_dtype: str) -> bytes:
    """The wire bytes of ``array`` in ``wire_dtype``."""
    wire_dtype = wire_dtype_name(wire_dtype)
    values = np.ascontiguousarray(array, dtype=np.float32)
    if values.size == 0:
        return b""
    if wire_dtype == "float32":
        return values.astype("<f4").tobytes()
    if wire_dtype == "float16":
        return values.astype("<f2").tobytes()
    if wire_dtype == "bfloat16":
        return _to_bfloat16_bits(values).tobytes()
    rows = values.reshape(_rows(values.shape), -1)
    scale = (np.abs(rows).max(axis=1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    quantized = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
    return scale.astype("<f4").tobytes() + quantized.tobytes()


def array_chunks(name: str, array: np.ndarray, wire_dtype: str = "float32",
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[TensorChunk]:
    """Cuts ``array`` into chunks of its wire bytes (as :func:`protocol.tensors.tensor_chunks`)."""
    wire_dtype = wire_dtype_name(wire_dtype)
    data = encode_array(array, wire_dtype)
    shape, total = tuple(int(d) for d in array.shape), len(data)
    for offset in range(0, max(total, 1), chunk_bytes):
        yield TensorChunk(name, wire_dtype, shape, total, offset, data[offset:offset + chunk_bytes])


def checked_wire_shape(dtype_name: str, shape: Iterable[int], data: bytes) -> tuple[str, tuple[int, ...]]:
    """The canonical dtype and the shape of wire bytes, after checking that ``data`` fills ``shape`` exactly.

    Shared by the numpy and the torch decoders, so both refuse the same malformed chunks.
    """
    dtype_name, shape = wire_dtype_name(dtype_name), tuple(shape)
    if any(d < 0 for d in shape):
        raise WireFormatError(f"negative dimension in shape {shape}")
    expected = wire_nbytes(dtype_name, shape)
    if len(data) != expected:
        raise WireFormatError(f"{len(data)} bytes do not fill shape {shape} of {dtype_name} ({expected})")
    return dtype_name, shape


def array_from_bytes(dtype_name: str, shape: Iterable[int], data: bytes) -> np.ndarray:
    """Rebuilds a float32 array from wire bytes, checking the size against the shape."""
    dtype_name, shape = checked_wire_shape(dtype_name, shape, data)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=np.float32)
    if dtype_name == "float32":
        return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)
    if dtype_name == "float16":
        return np.frombuffer(data, dtype="<f2").reshape(shape).astype(np.float32)
    if dtype_name == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32).reshape(shape)
    n_scales = _rows(shape) * SCALE_BYTES
    scale = np.frombuffer(data[:n_scales], dtype="<f4").reshape(-1, 1)
    values = np.frombuffer(data[n_scales:], dtype=np.int8).reshape(scale.shape[0], -1)
    return (values.astype(np.float32) * scale).reshape(shape)


class ArrayAssembler:
    """Collects the chunks of one tensor at a time; returns the float32 array once it is complete."""

    def __init__(self) -> None:
        self._head: TensorChunk | None = None
        self._buf = bytearray()

    def feed(self, chunk: TensorChunk) -> np.ndarray | None:
        if self._head is None:
            if chunk.offset != 0:
                raise WireFormatError(f"tensor {chunk.name!r} starts at offset {chunk.offset}, not 0")
            self._head = chunk
        elif chunk.name != self._head.name or chunk.offset != len(self._buf):
            raise WireFormatError(f"chunk of {chunk.name!r} at offset {chunk.offset} is out of order")
        self._buf += chunk.data
        if len(self._buf) > self._head.total_bytes:
            raise WireFormatError(f"tensor {chunk.name!r} has more bytes than announced")
        if len(self._buf) < self._head.total_bytes:
            return None
        head, data = self._head, bytes(self._buf)
        self._head, self._buf = None, bytearray()
        return array_from_bytes(head.dtype, head.shape, data)
