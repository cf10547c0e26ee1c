"""TensorData: a dense tensor, and the conversion of a Datum's loss inputs to it.

Plain numpy; torch is imported only by the `*_torch` methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DTYPES = ("float32", "int64", "int32")
"""Element types a TensorData holds (the wire's bfloat16 arrives widened to float32)."""

_INT64_KEYS = frozenset({"target_tokens"})
_FLOAT32_KEYS = frozenset(
    {
        "weights",
        "advantages",
        "logprobs",
        "clip_low_threshold",
        "clip_high_threshold",
        "sequence_ratio_mask",
    }
)

LossFnInput = Any  # TensorData, a (nested) list, a numpy array or a torch tensor


class TensorData:
    """A dense tensor: dtype name, shape and row-major elements (held as a numpy array)."""

    __slots__ = ("_array",)

    def __init__(
        self, data: Sequence[Any] | np.ndarray, dtype: str, shape: Sequence[int] | None = None
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
        array = np.asarray(data, dtype=dtype)
        if shape is not None:
            array = array.reshape(tuple(int(d) for d in shape))
        self._array = array

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Wrap an array; floats become float32, integers int64 (int32 is kept), bools float32."""
        array = np.asarray(array)
        return cls(array, _dtype_for_array(array))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """Copy a torch tensor (any device; bfloat16/float16/float64 become float32)."""
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return cls.from_numpy(tensor.numpy())

    @property
    def dtype(self) -> str:
        return self._array.dtype.name

    @property
    def shape(self) -> list[int]:
        return list(self._array.shape)

    @property
    def data(self) -> list[Any]:
        """The elements, flattened, as Python numbers."""
        return self._array.reshape(-1).tolist()

    def to_numpy(self) -> np.ndarray:
        return self._array.copy()

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[Any]:
        """The elements nested by shape."""
        return self._array.tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return self.dtype == other.dtype and np.array_equal(self._array, other._array)

    __hash__ = None  # mutable-by-content, like a list

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape})"


def to_tensor_data(key: str, value: LossFnInput) -> TensorData:
    """Convert one loss input to TensorData, choosing list dtypes by key like Tinker."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if _is_torch_tensor(value):
        return TensorData.from_torch(value)
    if key in _INT64_KEYS:
        return TensorData(value, "int64")
    if key in _FLOAT32_KEYS:
        return TensorData(value, "float32")
    return TensorData.from_numpy(np.asarray(value))


def _dtype_for_array(array: np.ndarray) -> str:
    kind = array.dtype.kind
    if kind in "fb":
        return "float32"
    if array.dtype == np.int32:
        return "int32"
    if kind in "iu":
        return "int64"
    raise TypeError(f"cannot make a tensor from numpy dtype {array.dtype}")


def _is_torch_tensor(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and hasattr(value, "detach")
