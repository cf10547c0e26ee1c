"""tunemesh.tensors, the one tensor codec: TensorData <-> numpy round trips and the refusal
of malformed tensors (INVALID_ARGUMENT [BAD_TENSOR], naming the tensor)."""

from __future__ import annotations

import numpy as np
import pytest

from tunemesh import tensors
from tunemesh.errors import InvalidArgumentError
from tunemesh.v1 import types_pb2


@pytest.mark.parametrize(
    "array, dtype",
    [
        (np.array([[1.5, -2.25, 3e-8], [0.0, np.inf, -0.0]], dtype=np.float32), types_pb2.DTYPE_FLOAT32),
        (np.array([0, -1, 2**40, -(2**62)], dtype=np.int64), types_pb2.DTYPE_INT64),
        (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7, types_pb2.DTYPE_INT32),
        (np.zeros((0, 3), dtype=np.float32), types_pb2.DTYPE_FLOAT32),
    ],
)
def test_round_trip_keeps_dtype_shape_and_values(array, dtype):
    proto = tensors.encode(array)
    assert proto.dtype == dtype
    assert list(proto.shape) == list(array.shape)
    assert proto.data == array.astype(array.dtype.newbyteorder("<")).tobytes()  # little-endian bytes
    back = tensors.decode(types_pb2.TensorData.FromString(proto.SerializeToString()))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_encode_widens_and_narrows_like_documented():
    assert tensors.encode(np.array([1.0, 2.0])).dtype == types_pb2.DTYPE_FLOAT32  # float64 -> f32
    assert tensors.encode(np.array([1, 2], dtype=np.int16)).dtype == types_pb2.DTYPE_INT64
    assert tensors.encode(np.array([True, False])).dtype == types_pb2.DTYPE_INT64
    big_endian = np.array([1, 258], dtype=">i8")
    np.testing.assert_array_equal(tensors.decode(tensors.encode(big_endian)), [1, 258])


def test_bfloat16_decodes_to_the_float32_with_those_upper_bits():
    values = np.array([1.0, -2.5, 0.15625, 2.0**127, -np.inf], dtype=np.float32)  # exact in bf16
    upper = (values.view(np.uint32) >> 16).astype("<u2")
    proto = types_pb2.TensorData(dtype=types_pb2.DTYPE_BFLOAT16, shape=[5], data=upper.tobytes())
    decoded = tensors.decode(proto)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, values)
    # Truncation semantics: 1 + 2**-10 is not representable; bf16 keeps 1.0.
    approx = np.array([1.0 + 2**-10], dtype=np.float32)
    trunc = (approx.view(np.uint32) >> 16).astype("<u2").tobytes()
    proto = types_pb2.TensorData(dtype=types_pb2.DTYPE_BFLOAT16, shape=[1, 1], data=trunc)
    np.testing.assert_array_equal(tensors.decode(proto), [[1.0]])


def _bad(dtype, shape, data) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as info:
        tensors.decode(types_pb2.TensorData(dtype=dtype, shape=shape, data=data), name="weights")
    assert info.value.reason == "BAD_TENSOR"
    assert "weights" in info.value.message
    return info.value


@pytest.mark.parametrize(
    "dtype, shape, data",
    [
        (types_pb2.DTYPE_FLOAT32, [2], b"\x00" * 7),  # not whole elements
        (types_pb2.DTYPE_INT64, [1], b"\x00" * 4),
        (types_pb2.DTYPE_INT32, [3], b"\x00" * 8),  # whole elements, wrong count
        (types_pb2.DTYPE_FLOAT32, [2, 3], b"\x00" * 4 * 5),
        (types_pb2.DTYPE_FLOAT32, [-1, 2], b"\x00" * 8),  # negative dimension
        (types_pb2.DTYPE_BFLOAT16, [2], b"\x00" * 2),
        (types_pb2.DTYPE_BFLOAT16, [2], b"\x00" * 3),  # odd byte count
        (types_pb2.DTYPE_UNSPECIFIED, [1], b"\x00" * 4),
        (99, [1], b"\x00" * 4),
        (types_pb2.DTYPE_FLOAT32, [2**32, 2**32], b""),  # element count overflows int64
        (types_pb2.DTYPE_FLOAT32, [], b"\x00" * 8),  # a scalar holds one element
    ],
)
def test_malformed_tensors_are_invalid_argument(dtype, shape, data):
    _bad(dtype, shape, data)


def test_scalar_shape_decodes_to_a_scalar():
    proto = types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[], data=np.float32(2.5).tobytes())
    value = tensors.decode(proto)
    assert value.shape == () and float(value) == 2.5
    assert tensors.encode(np.float32(2.5)).shape == []


def test_encode_refuses_what_has_no_wire_dtype():
    with pytest.raises(TypeError, match="complex"):
        tensors.encode(np.array([1 + 2j]))
