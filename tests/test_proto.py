"""The wire contract: generated modules are current, and the Tensor codec is exact and strict."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from opd.tensors import WIRE_DTYPES, MalformedTensor, from_tensor, to_tensor
from opd.v1 import teacher_pb2

REPO = Path(__file__).resolve().parents[1]


def test_generated_modules_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"stale generated modules:\n{result.stdout}\n{result.stderr}"
    assert "up to date" in result.stdout


def _sample(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "float32":
        array = rng.standard_normal(shape).astype(np.float32)
        if array.size:
            flat = array.reshape(-1)
            flat[0] = -np.inf  # the pad value of logprobs must survive the trip
            if flat.size > 1:
                flat[1] = np.float32(1e-38)
        return array
    info = np.iinfo(dtype)
    array = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if array.size:
        array.reshape(-1)[0] = info.min
        array.reshape(-1)[-1] = info.max
    return array


SHAPES = [(0,), (1,), (7,), (3, 5), (0, 4), (4, 0), (2, 3, 4), ()]


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_round_trip(dtype, shape):
    rng = np.random.default_rng(zlib.crc32(repr((dtype, shape)).encode()))
    array = _sample(dtype, shape, rng)
    message = to_tensor(array)
    assert message.dtype == dtype
    assert list(message.shape) == list(shape)
    assert len(message.data) == array.size * np.dtype(dtype).itemsize
    # Through the actual protobuf wire encoding, not just the in-memory message.
    decoded_message = teacher_pb2.Tensor.FromString(message.SerializeToString())
    back = from_tensor(decoded_message, name="x", dtype=dtype, ndim=len(shape))
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)
    if dtype == "float32":
        assert back.tobytes() == array.tobytes()  # bit-exact, -inf and denormal-ish values included


def test_round_trip_of_non_contiguous_input():
    array = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    assert not array.flags.c_contiguous
    back = from_tensor(to_tensor(array), name="x")
    np.testing.assert_array_equal(back, array)


def test_data_is_raw_little_endian_bytes():
    message = to_tensor(np.array([1, 256], dtype=np.int32))
    assert message.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    message = to_tensor(np.array([1.0], dtype=np.float32))
    assert message.data == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32"])
def test_big_endian_input_is_encoded_little_endian(dtype):
    native = np.array([1, -2, 300, 70000], dtype=dtype)
    big = native.astype(np.dtype(dtype).newbyteorder(">"))
    assert big.dtype.byteorder == ">"
    message = to_tensor(big)
    assert message.dtype == dtype  # the name carries no byte order
    assert message.data == native.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert message.data != big.tobytes()
    np.testing.assert_array_equal(from_tensor(message, name="x"), native)


def test_to_tensor_rejects_non_wire_dtype():
    with pytest.raises(MalformedTensor, match="float64"):
        to_tensor(np.zeros(3, dtype=np.float64))


def _tensor(dtype: str, shape, data: bytes) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def test_from_tensor_wrong_dtype_names_field_and_both_dtypes():
    message = to_tensor(np.zeros(4, dtype=np.float32))
    with pytest.raises(MalformedTensor) as caught:
        from_tensor(message, name="tokens", dtype="int32", ndim=1)
    text = str(caught.value)
    assert "tokens" in text and "'int32'" in text and "'float32'" in text


def test_from_tensor_wrong_ndim_names_field_and_shape():
    message = to_tensor(np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(MalformedTensor) as caught:
        from_tensor(message, name="tokens", dtype="int32", ndim=1)
    text = str(caught.value)
    assert "tokens" in text and "1 dimension" in text and "[2, 3]" in text


def test_from_tensor_negative_dimension():
    with pytest.raises(MalformedTensor) as caught:
        from_tensor(_tensor("int32", [-1, 2], b""), name="ids")
    text = str(caught.value)
    assert "ids" in text and "negative" in text and "[-1, 2]" in text


def test_from_tensor_negative_dimensions_whose_product_matches_are_still_rejected():
    # (-1) x (-2) = 2 elements = 8 bytes: the length check alone would accept it.
    with pytest.raises(MalformedTensor, match="negative"):
        from_tensor(_tensor("int32", [-1, -2], b"\x00" * 8), name="ids")


@pytest.mark.parametrize("length", [0, 11, 13, 16])
def test_from_tensor_data_length_mismatch(length):
    with pytest.raises(MalformedTensor) as caught:
        from_tensor(_tensor("int32", [3], b"\x00" * length), name="tokens", dtype="int32", ndim=1)
    text = str(caught.value)
    assert "tokens" in text and "12 bytes" in text and f"data has {length}" in text


def test_from_tensor_unknown_dtype_lists_the_allowed_ones():
    with pytest.raises(MalformedTensor) as caught:
        from_tensor(_tensor("complex64", [1], b"\x00" * 8), name="logprobs")
    text = str(caught.value)
    assert "logprobs" in text and "'complex64'" in text
    for allowed in WIRE_DTYPES:
        assert allowed in text


@pytest.mark.parametrize("bogus", ["", "not-a-dtype", "<i4", "float64", "object"])
def test_from_tensor_rejects_anything_outside_the_contract(bogus):
    with pytest.raises(MalformedTensor, match="is not one of"):
        from_tensor(_tensor(bogus, [1], b"\x00" * 8), name="x")


def test_malformed_tensor_is_a_value_error():
    assert issubclass(MalformedTensor, ValueError)


def test_decoded_array_is_read_only_view_of_the_message():
    back = from_tensor(to_tensor(np.arange(5, dtype=np.int32)), name="x")
    assert not back.flags.writeable
