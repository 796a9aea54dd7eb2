import hashlib

import pytest
import torch

from protocol.serde import WireFormatError
from protocol.tensors import (
    TensorAssembler,
    element_size,
    file_chunks,
    receive_files,
    tensor_chunks,
    wire_dtype_name,
    wire_nbytes,
)
from protocol.types import FileChunk, TensorChunk


@pytest.mark.parametrize("dtype, tol", [("float32", 0.0), ("bfloat16", 1e-2), ("float16", 1e-3)])
def test_tensor_round_trip_in_each_wire_dtype(dtype, tol):
    x = torch.randn(3, 5, 7)
    assembler = TensorAssembler()
    chunks = list(tensor_chunks("x", x, dtype, chunk_bytes=64))
    assert len(chunks) > 1 and all(len(c.data) <= 64 for c in chunks)
    assert sum(len(c.data) for c in chunks) == x.numel() * element_size(dtype)
    results = [assembler.feed(c) for c in chunks]
    assert all(r is None for r in results[:-1])
    torch.testing.assert_close(results[-1], x, rtol=tol, atol=tol)


def test_large_tensor_is_chunked_below_message_limit():
    x = torch.zeros(8, 1024, 576)  # 18.9 MB in fp32: over gRPC's 4 MiB default
    chunks = list(tensor_chunks("x", x))
    assert len(chunks) == 18 and max(len(c.data) for c in chunks) == 1 << 20


def test_assembler_rejects_out_of_order_and_oversized():
    chunks = list(tensor_chunks("x", torch.ones(4, 4), chunk_bytes=16))
    assembler = TensorAssembler()
    assembler.feed(chunks[0])
    with pytest.raises(WireFormatError, match="out of order"):
        assembler.feed(chunks[2])
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        TensorAssembler(max_bytes=32).feed(chunks[0])
    with pytest.raises(WireFormatError, match="do not fill shape"):
        TensorAssembler().feed(TensorChunk("x", "float32", (2, 2), 12, 0, b"\0" * 12))
    with pytest.raises(WireFormatError, match="unknown wire dtype"):
        TensorAssembler().feed(TensorChunk("x", "complex64", (1,), 8, 0, b"\0" * 8))


def test_files_round_trip_and_corruption_detected(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(bytes(range(256)) * 10)
    chunks = list(file_chunks(src, chunk_bytes=1000))
    assert chunks[-1].sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert receive_files(chunks, tmp_path / "out") == ["a.bin"]
    assert (tmp_path / "out" / "a.bin").read_bytes() == src.read_bytes()
    bad = [FileChunk(c.name, c.total_bytes, c.offset, c.data[::-1], c.sha256) for c in chunks]
    with pytest.raises(WireFormatError, match="corrupted"):
        receive_files(bad, tmp_path / "bad")
    with pytest.raises(WireFormatError, match="refusing file name"):
        receive_files([FileChunk("../x", 1, 0, b"x", "")], tmp_path / "evil")


def _round_trip(x, dtype):
    assembler = TensorAssembler()
    results = [assembler.feed(c) for c in tensor_chunks("x", x, dtype, chunk_bytes=256)]
    return results[-1]


# Round-to-nearest bounds: half an ulp relative for the float formats (bf16 keeps 8 significand
# bits, fp16 11), half a quantization step (absmax/127/2) per token row for int8.
@pytest.mark.parametrize("dtype, rel", [("fp32", 0.0), ("bf16", 2.0**-8), ("fp16", 2.0**-11)])
def test_float_wire_dtypes_meet_their_relative_error_bound(dtype, rel):
    magnitude = (0.5 + torch.rand(4, 9, 33)) * torch.logspace(-3, 3, 33)  # six decades, all fp16-normal
    x = torch.randn(4, 9, 33).sign() * magnitude
    y = _round_trip(x, dtype)
    assert ((y - x).abs() <= rel * x.abs()).all()


def test_int8_meets_per_token_absmax_bound_and_is_4x_smaller():
    x = torch.randn(4, 9, 64) * torch.logspace(-4, 2, 36).reshape(4, 9, 1)  # very different token scales
    y = _round_trip(x, "int8")
    bound = x.abs().amax(dim=-1, keepdim=True) / 254 * (1 + 1e-5)
    assert ((y - x).abs() <= bound).all()
    assert ((y - x).abs() > 0).any()  # it really is lossy: the bound is what is tested
    fp32, int8 = wire_nbytes("float32", x.shape), wire_nbytes("int8", x.shape)
    assert int8 == x.numel() + 36 * 4  # one byte per value, one float32 scale per token
    assert fp32 / int8 == pytest.approx(4 / (1 + 4 / 64))
    torch.testing.assert_close(_round_trip(torch.zeros(2, 3, 5), "int8"), torch.zeros(2, 3, 5), rtol=0, atol=0)


@pytest.mark.parametrize("short, long", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"),
                                         ("int8", "int8"), ("float16", "float16")])
def test_short_wire_dtype_names_map_to_canonical_names(short, long):
    assert wire_dtype_name(short) == long
    assert {c.dtype for c in tensor_chunks("x", torch.ones(2, 2), short)} == {long}


def test_unknown_wire_dtype_names_every_choice():
    with pytest.raises(WireFormatError, match="fp32, bf16, fp16, float32, bfloat16, float16, int8"):
        wire_dtype_name("int4")
