"""numpy <-> `tunemesh.v1.TensorData` codec: {dtype, shape, little-endian bytes}."""

from __future__ import annotations

import math

import numpy as np

from tunemesh.v1 import types_pb2
from tunemesh_common.errors import InvalidArgument

_NUMPY_BY_DTYPE = {
    types_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.DTYPE_INT64: np.dtype("<i8"),
    types_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_DTYPE_BY_KIND = {np.dtype("<f4"): types_pb2.DTYPE_FLOAT32, np.dtype("<i8"): types_pb2.DTYPE_INT64,
                  np.dtype("<i4"): types_pb2.DTYPE_INT32}


def decode(tensor: types_pb2.TensorData, *, name: str = "tensor") -> np.ndarray:
    """Decode a TensorData; raise InvalidArgument if its bytes do not match its shape.

    The element count is the product of `shape` (1 for a scalar, shape `[]`).
    """
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument("BAD_TENSOR", f"{name}: negative dimension in shape {list(shape)}")
    if tensor.dtype == types_pb2.DTYPE_BFLOAT16:
        wire = np.dtype("<u2")
    elif tensor.dtype in _NUMPY_BY_DTYPE:
        wire = _NUMPY_BY_DTYPE[tensor.dtype]
    else:
        raise InvalidArgument("BAD_TENSOR", f"{name}: unsupported dtype {tensor.dtype}")
    expected = math.prod(shape)  # Python ints: no overflow
    if len(tensor.data) != expected * wire.itemsize:
        raise InvalidArgument(
            "BAD_TENSOR",
            f"{name}: shape {list(shape)} needs {expected} elements of {wire.itemsize} bytes, "
            f"data has {len(tensor.data)} bytes",
        )
    values = np.frombuffer(tensor.data, dtype=wire)
    if tensor.dtype == types_pb2.DTYPE_BFLOAT16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.reshape(shape)


def encode(array: np.ndarray) -> types_pb2.TensorData:
    """Encode float arrays as float32, integer arrays as int64 (int32 kept)."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype("<f4", copy=False)
    elif array.dtype.kind in "iub" and array.dtype != np.dtype("<i4"):
        array = array.astype("<i8", copy=False)
    dtype = _DTYPE_BY_KIND[array.dtype]
    return types_pb2.TensorData(dtype=dtype, shape=list(array.shape), data=np.ascontiguousarray(array).tobytes())
