"""Pack numpy arrays into `opd.v1.Tensor` messages and back.

Arrays travel as raw little-endian bytes with dtype and shape (never as repeated
fields), so a [P, K] float32 array costs 4*P*K bytes and one memcpy each way.
"""

from __future__ import annotations

import numpy as np

from opd.v1 import teacher_pb2

# Only these dtypes are part of the contract; anything else is a malformed tensor.
WIRE_DTYPES = {"int32", "int64", "float32", "uint8"}


class MalformedTensor(ValueError):
    """A Tensor message whose dtype, shape and data do not agree."""


def to_tensor(array: np.ndarray) -> teacher_pb2.Tensor:
    array = np.asarray(array)
    if array.dtype.name not in WIRE_DTYPES:
        raise MalformedTensor(f"dtype {array.dtype.name} is not one of {sorted(WIRE_DTYPES)}")
    little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return teacher_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=little_endian.tobytes())


def from_tensor(
    tensor: teacher_pb2.Tensor, *, name: str, dtype: str | None = None, ndim: int | None = None
) -> np.ndarray:
    """Decode `tensor` (the field called `name`, for error messages) into a read-only array.

    `dtype` and `ndim`, when given, are what the caller requires.
    """
    if dtype is not None and tensor.dtype != dtype:
        raise MalformedTensor(f"{name}: dtype must be {dtype!r}, got {tensor.dtype!r}")
    if tensor.dtype not in WIRE_DTYPES:
        raise MalformedTensor(f"{name}: dtype {tensor.dtype!r} is not one of {sorted(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)
    if ndim is not None and len(shape) != ndim:
        raise MalformedTensor(f"{name}: expected {ndim} dimension(s), got shape {list(shape)}")
    if any(dim < 0 for dim in shape):
        raise MalformedTensor(f"{name}: negative dimension in shape {list(shape)}")
    wire_dtype = np.dtype(tensor.dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * wire_dtype.itemsize != len(tensor.data):
        raise MalformedTensor(
            f"{name}: shape {list(shape)} of {tensor.dtype} needs {count * wire_dtype.itemsize} bytes, "
            f"data has {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=wire_dtype).reshape(shape).astype(tensor.dtype, copy=False)
