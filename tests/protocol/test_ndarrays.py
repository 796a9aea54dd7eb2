"""The numpy wire codec writes and reads exactly the bytes of the torch one."""

import numpy as np
import pytest
import torch

from protocol.ndarrays import ArrayAssembler, array_chunks, array_from_bytes, encode_array
from protocol.serde import WireFormatError
from protocol.tensors import TensorAssembler, encode_tensor, tensor_chunks, tensor_from_bytes

DTYPES = ["float32", "bfloat16", "float16", "int8"]


def _values(shape=(3, 5, 7)) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    values[0, 0, :] = 0.0  # an all-zero row: int8 scale 0
    values[1, 1, 1] = 1.0 + 2 ** -8  # a bfloat16 tie, rounded to even
    values[1, 1, 2] = -(1.0 + 3 * 2 ** -8)
    return values


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_match_the_torch_codec(dtype):
    values = _values()
    assert encode_array(values, dtype) == encode_tensor(torch.from_numpy(values), dtype)
    data = encode_array(values, dtype)
    np.testing.assert_array_equal(array_from_bytes(dtype, values.shape, data),
                                  tensor_from_bytes(dtype, values.shape, data).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_round_trip_through_the_torch_assembler(dtype):
    values = _values((4, 33, 16))
    chunks = list(array_chunks("hidden", values, dtype, chunk_bytes=100))
    assert chunks == list(tensor_chunks("hidden", torch.from_numpy(values), dtype, chunk_bytes=100))
    torch_side, numpy_side = TensorAssembler(), ArrayAssembler()
    results = [(torch_side.feed(c), numpy_side.feed(c)) for c in chunks]
    assert all(t is None and n is None for t, n in results[:-1])
    np.testing.assert_array_equal(results[-1][1], results[-1][0].numpy())


def test_size_mismatch_is_refused():
    with pytest.raises(WireFormatError, match="do not fill"):
        array_from_bytes("float32", (2, 3), b"\0" * 20)
    with pytest.raises(WireFormatError, match="unknown wire dtype"):
        encode_array(np.zeros(3, np.float32), "float64")
