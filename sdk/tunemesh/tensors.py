"""numpy <-> `tunemesh.v1.TensorData`: {dtype, shape, little-endian row-major bytes}.

The one tensor codec of the wire: the SDK and every service encode and decode with it.
Decoding checks what arrives and refuses it as INVALID_ARGUMENT [BAD_TENSOR], naming the
tensor: a dtype outside float32 / int64 / int32 / bfloat16, a negative dimension, more
than MAX_DIMS dimensions, a shape whose non-zero dimensions multiply past MAX_ELEMENTS
(even with a zero dimension, so holding no element), or bytes that are not exactly the
elements the shape needs.
"""

from __future__ import annotations

import math

import numpy as np

from tunemesh.errors import InvalidArgumentError
from tunemesh.v1 import types_pb2

BAD_TENSOR = "BAD_TENSOR"
MAX_DIMS = 8  # dimensions of a wire tensor (numpy's own limit is 64)
MAX_ELEMENTS = 2**31 - 1  # elements a shape may describe, zero dimensions left out (no message holds more)

_NUMPY_BY_DTYPE = {
    types_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    types_pb2.DTYPE_INT64: np.dtype("<i8"),
    types_pb2.DTYPE_INT32: np.dtype("<i4"),
    types_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),  # the upper half of a float32, widened on decode
}
_DTYPE_BY_NUMPY = {np.dtype("<f4"): types_pb2.DTYPE_FLOAT32, np.dtype("<i8"): types_pb2.DTYPE_INT64,
                   np.dtype("<i4"): types_pb2.DTYPE_INT32}


def encode(array: np.ndarray) -> types_pb2.TensorData:
    """Encode float arrays as float32, integer and bool arrays as int64 (int32 kept)."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = array.astype("<f4", copy=False)
    elif array.dtype.kind in "iub" and array.dtype != np.dtype("<i4"):
        array = array.astype("<i8", copy=False)
    if array.dtype not in _DTYPE_BY_NUMPY:
        raise TypeError(f"cannot encode a tensor of numpy dtype {array.dtype}")
    return types_pb2.TensorData(dtype=_DTYPE_BY_NUMPY[array.dtype], shape=list(array.shape),
                                data=np.ascontiguousarray(array).tobytes())


def decode(tensor: types_pb2.TensorData, *, name: str = "tensor") -> np.ndarray:
    """The array of a TensorData (float32, int64 or int32; bfloat16 widens to float32).

    The element count is the product of `shape` (1 for a scalar, shape `[]`). Raises
    InvalidArgumentError [BAD_TENSOR] naming `name` when the tensor is malformed.
    """
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(BAD_TENSOR, f"{name}: negative dimension in shape {list(shape)}")
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidArgumentError(
            BAD_TENSOR, f"{name}: shape {list(shape[:MAX_DIMS + 1])} has more than {MAX_DIMS} dimensions "
            f"or describes more than {MAX_ELEMENTS} elements"
        )
    wire = _NUMPY_BY_DTYPE.get(tensor.dtype)
    if wire is None:
        raise InvalidArgumentError(BAD_TENSOR, f"{name}: unsupported dtype {tensor.dtype}")
    expected = math.prod(shape)  # Python ints: no overflow
    if len(tensor.data) != expected * wire.itemsize:
        raise InvalidArgumentError(
            BAD_TENSOR,
            f"{name}: shape {list(shape)} needs {expected} elements of {wire.itemsize} bytes, "
            f"data has {len(tensor.data)} bytes",
        )
    values = np.frombuffer(tensor.data, dtype=wire)
    if tensor.dtype == types_pb2.DTYPE_BFLOAT16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.reshape(shape)
