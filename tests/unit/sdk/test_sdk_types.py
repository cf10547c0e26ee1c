"""tunemesh.types and their wire form."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

import tunemesh
from tunemesh import _wire
from tunemesh.v1 import types_pb2


@pytest.mark.parametrize(
    ("dtype", "values", "fmt"),
    [("float32", [1.5, -2.25, 3e-8, 0.0, 7.0, -1e30], "<6f"),
     ("int64", [0, -1, 2**40, 5, -(2**62), 9], "<6q"),
     ("int32", [0, -1, 2**30, 5, -7, 9], "<6i")],
)
def test_tensor_round_trips_through_little_endian_bytes(dtype, values, fmt):
    tensor = tunemesh.TensorData(values, dtype, shape=[2, 3])
    msg = _wire.tensor_to_proto(tensor)
    assert list(msg.shape) == [2, 3]
    assert msg.data == struct.pack(fmt, *np.asarray(values, dtype=dtype).tolist())
    back = _wire.tensor_from_proto(types_pb2.TensorData.FromString(msg.SerializeToString()))
    assert back == tensor and back.dtype == dtype and back.shape == [2, 3]
    assert back.data == np.asarray(values, dtype=dtype).tolist()
    assert back.tolist() == np.asarray(values, dtype=dtype).reshape(2, 3).tolist()


def test_bfloat16_from_the_wire_widens_to_float32():
    upper = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in (1.0, -2.5, 0.15625)]
    msg = types_pb2.TensorData(
        dtype=types_pb2.DTYPE_BFLOAT16, shape=[3], data=struct.pack("<3H", *upper)
    )
    tensor = _wire.tensor_from_proto(msg)
    assert tensor.dtype == "float32" and tensor.data == [1.0, -2.5, 0.15625]


def test_tensor_with_wrong_byte_count_is_rejected():
    msg = types_pb2.TensorData(dtype=types_pb2.DTYPE_INT64, shape=[2], data=b"\0" * 12)
    with pytest.raises(tunemesh.InvalidArgumentError, match="12 bytes") as info:
        _wire.tensor_from_proto(msg)
    assert info.value.reason == "BAD_TENSOR"


def test_numpy_and_torch_conversions():
    torch = pytest.importorskip("torch")
    assert tunemesh.TensorData.from_numpy(np.arange(4, dtype=np.float64)).dtype == "float32"
    assert tunemesh.TensorData.from_numpy(np.arange(4, dtype=np.int16)).dtype == "int64"
    assert tunemesh.TensorData.from_numpy(np.array([True, False])).data == [1.0, 0.0]
    bf16 = torch.tensor([[1.0, 2.5]], dtype=torch.bfloat16)
    tensor = tunemesh.TensorData.from_torch(bf16)
    assert tensor.dtype == "float32" and tensor.shape == [1, 2]
    back = tensor.to_torch()
    assert back.dtype == torch.float32 and back.tolist() == [[1.0, 2.5]]
    ints = tunemesh.TensorData.from_torch(torch.tensor([3, 4]))
    assert ints.dtype == "int64" and ints.to_torch().tolist() == [3, 4]


def test_datum_converts_lists_by_key_and_keeps_numpy_kinds():
    datum = tunemesh.Datum(
        tunemesh.ModelInput.from_ints([1, 2, 3]),
        {
            "target_tokens": [2, 3, 4],
            "weights": [1, 1, 0],
            "advantages": [0, 1, 2],
            "logprobs": [-1, -2, -3],
            "mask": np.array([1, 0, 1], dtype=np.int32),
            "ratio": np.array([0.5, 1.0, 2.0]),
            "ready": tunemesh.TensorData([7], "int64"),
        },
    )
    dtypes = {key: t.dtype for key, t in datum.loss_fn_inputs.items()}
    assert dtypes == {
        "target_tokens": "int64", "weights": "float32", "advantages": "float32",
        "logprobs": "float32", "mask": "int32", "ratio": "float32", "ready": "int64",
    }
    assert datum.loss_fn_inputs["weights"].data == [1.0, 1.0, 0.0]


def test_datum_round_trips_through_proto():
    datum = tunemesh.Datum(
        tunemesh.ModelInput([tunemesh.EncodedTextChunk([5, 6]), tunemesh.EncodedTextChunk([7])]),
        {"target_tokens": [[6, 1], [7, 2], [8, 3]], "weights": [[1, 0.5]] * 3},
    )
    msg = _wire.datum_to_proto(datum)
    back = _wire.datum_from_proto(types_pb2.Datum.FromString(msg.SerializeToString()))
    assert back.model_input.to_ints() == [5, 6, 7] and len(back.model_input.chunks) == 2
    assert back.loss_fn_inputs == datum.loss_fn_inputs
    assert back.loss_fn_inputs["target_tokens"].shape == [3, 2]


def test_model_input_helpers():
    mi = tunemesh.ModelInput.from_ints([1, 2])
    longer = mi.append_int(3).append(tunemesh.EncodedTextChunk([4, 5]))
    assert mi.to_ints() == [1, 2]  # immutable
    assert longer.to_ints() == [1, 2, 3, 4, 5] and longer.length == 5
    assert len(longer.chunks) == 2
    assert tunemesh.ModelInput.empty().append_int(9).to_ints() == [9]


def test_loss_config_and_adam_params_to_proto():
    config = _wire.loss_config_to_proto({"clip_low_threshold": 0.8, "loss_id": "x", "k": 2})
    assert config["clip_low_threshold"].number == pytest.approx(0.8)
    assert config["loss_id"].text == "x" and config["k"].number == 2.0
    with pytest.raises(TypeError):
        _wire.loss_config_to_proto({"bad": [1]})
    adam = _wire.adam_to_proto(tunemesh.AdamParams())
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.eps) == (1e-4, 0.9, 0.95, 1e-12)
    assert adam.weight_decay == 0.0 and adam.grad_clip_norm == 0.0


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="unsupported dtype"):
        tunemesh.TensorData([1.0], "float16")


def test_importing_tunemesh_loads_no_heavy_modules():
    code = (
        "import sys, tunemesh, tunemesh.v1.training_pb2\n"
        "names = ('torch', 'transformers', 'grpc', 'numpy')\n"
        "print([m for m in names if m in sys.modules])\n"
        "tunemesh.ServiceClient, tunemesh.Datum\n"
        "print([m for m in names[:2] if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]
