"""Property tests of the decoders and validators a request goes through before it is
queued: the tensor codec, the datum rules, the scheduler's validation functions, and the
decoders of what the scheduler keeps in etcd. Any input either passes or fails with a
typed tunemesh error (never IndexError, ValueError, OverflowError, MemoryError, ...).
Profiles and budget: conftest.py.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

import domain
import proto_strategies as ps
from tunemesh import tensors
from tunemesh.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from tunemesh.v1 import checkpoints_pb2, sampling_pb2, sessions_pb2, training_pb2, types_pb2
from tunemesh_common.training import datum_rules, loss_specs
from tunemesh_internal.v1 import scheduler_state_pb2
from tunemesh_scheduler import durable_codec, validation

MODEL = sessions_pb2.SupportedModel(name="tunemesh/tiny-dense", family="dense", vocab_size=domain.VOCAB,
                                    max_seq_len=domain.MAX_SEQ_LEN, max_lora_rank=128)
LIMITS = validation.Limits(max_datums=4, max_tokens=64)
HINTS = domain.hints()
CORPUS = pathlib.Path(__file__).parent / "corpus"


def typed(call, *errors: type[Exception]):
    """`call()`, or the typed error it raised (with a reason); anything else propagates."""
    try:
        return call()
    except errors as exc:
        assert exc.reason, f"{type(exc).__name__} without a reason: {exc}"
        return exc


# ---- the tensor codec -------------------------------------------------------------------


@given(ps.messages(types_pb2.TensorData.DESCRIPTOR, HINTS))
def test_decode_returns_the_tensor_or_bad_tensor(tensor):
    check_decode(tensor)


@pytest.mark.parametrize("file", sorted((CORPUS / "tensor").glob("*.txtpb")), ids=lambda f: f.stem)
def test_tensor_corpus(file):
    check_decode(text_format.Parse(file.read_text(), types_pb2.TensorData()))


def check_decode(tensor: types_pb2.TensorData) -> None:
    result = typed(lambda: tensors.decode(tensor, name="t"), InvalidArgumentError)
    if isinstance(result, InvalidArgumentError):
        assert result.reason == tensors.BAD_TENSOR
        return
    assert result.shape == tuple(tensor.shape)
    assert result.size * (2 if tensor.dtype == types_pb2.DTYPE_BFLOAT16 else result.itemsize) == len(tensor.data)


@given(domain.well_formed_tensors())
def test_well_formed_tensors_round_trip(tensor):
    array = tensors.decode(tensor)
    if tensor.dtype != types_pb2.DTYPE_BFLOAT16:
        assert tensors.encode(array).SerializeToString() == tensor.SerializeToString()


# ---- the datum rules --------------------------------------------------------------------


def arrays() -> st.SearchStrategy[np.ndarray]:
    return domain.well_formed_tensors().map(tensors.decode)


@given(tokens=arrays(), inputs=st.dictionaries(st.sampled_from(domain.LOSS_INPUT_KEYS + ["x"]), arrays(), max_size=4),
       loss=st.sampled_from(sorted(loss_specs.SPECS)), vocab_size=ps.integers(1, 2**40),
       max_seq_len=ps.integers(0, 2**31))
def test_check_datum_is_typed(tokens, inputs, loss, vocab_size, max_seq_len):
    n = typed(lambda: datum_rules.check_datum(tokens, inputs, loss_specs.SPECS[loss], vocab_size=vocab_size,
                                             max_seq_len=max_seq_len), InvalidArgumentError)
    if isinstance(n, int):
        assert n == tokens.shape[0] and 1 <= n <= max_seq_len


# ---- the scheduler's validation -------------------------------------------------------


@given(ps.messages(training_pb2.ForwardBackwardRequest.DESCRIPTOR, HINTS))
def test_check_data_and_loss_are_typed(request):
    loss_fn = request.loss_fn or "cross_entropy"
    typed(lambda: validation.check_loss(loss_fn, request.loss_fn_config), InvalidArgumentError)
    total = typed(lambda: validation.check_data(request.data, loss_fn, MODEL, LIMITS), InvalidArgumentError)
    if isinstance(total, int):
        assert 1 <= total <= LIMITS.max_tokens


@given(ps.messages(sampling_pb2.SampleRequest.DESCRIPTOR, HINTS))
def test_check_prompt_and_sampling_are_typed(request):
    tokens = typed(lambda: validation.check_prompt(request.prompt, MODEL), InvalidArgumentError)
    prompt_len = len(tokens) if isinstance(tokens, tuple) else 1
    typed(lambda: validation.check_sampling(request.sampling_params, request.num_samples, prompt_len, MODEL, LIMITS),
          InvalidArgumentError)


@given(ps.messages(types_pb2.LoraConfig.DESCRIPTOR), ps.messages(types_pb2.AdamParams.DESCRIPTOR))
def test_check_lora_and_adam_are_typed(lora, adam):
    if not isinstance(typed(lambda: validation.check_lora(lora, MODEL), InvalidArgumentError), Exception):
        normalized = validation.normalized_lora(lora, MODEL)
        assert 1 <= normalized.rank <= MODEL.max_lora_rank and math.isfinite(normalized.alpha)
    if not isinstance(typed(lambda: validation.check_adam(adam), InvalidArgumentError), Exception):
        assert all(math.isfinite(v) and v >= 0 for _, v in adam.ListFields()) and adam.eps > 0


@given(ps.messages(training_pb2.SaveStateRequest.DESCRIPTOR, HINTS),
       ps.messages(checkpoints_pb2.Checkpoint.DESCRIPTOR, HINTS), ps.messages(types_pb2.LoraConfig.DESCRIPTOR),
       st.booleans())
def test_check_save_and_checkpoint_fits_are_typed(save, checkpoint, lora, with_optimizer):
    typed(lambda: validation.check_save(save), InvalidArgumentError)
    typed(lambda: validation.check_checkpoint_fits(checkpoint, MODEL.name, lora, with_optimizer),
          FailedPreconditionError)


# ---- the durable codec --------------------------------------------------------------------

_DECODERS = {
    "StoredSession": durable_codec.session_record,
    "StoredSamplingSession": durable_codec.sampling_session_record,
    "StoredRun": durable_codec.run_record,
    "StoredOperation": durable_codec.operation_record,
    "StoredPayload": durable_codec.payload_of,
}


def decode_stored(type_name: str, data: bytes):
    """What durable.py does with a value read from etcd: parse, then decode."""
    message = getattr(scheduler_state_pb2, type_name).FromString(data)
    return _DECODERS[type_name](message)


@pytest.mark.parametrize("type_name", sorted(_DECODERS))
@given(data=st.data())
def test_durable_decoders_fail_cleanly(type_name, data):
    descriptor = getattr(scheduler_state_pb2, type_name).DESCRIPTOR
    raw = data.draw(st.one_of(st.binary(max_size=64),
                              ps.messages(descriptor, HINTS).map(lambda m: m.SerializeToString())), label="bytes")
    try:
        decode_stored(type_name, raw)
    except DecodeError:
        pass  # not a message of that type at all
    except DataLossError as exc:  # a message, but not one the scheduler writes
        assert exc.reason


@pytest.mark.parametrize("file", sorted((CORPUS / "durable").glob("*.txtpb")), ids=lambda f: f.stem)
def test_durable_corpus(file):
    type_name = file.name.split(".")[0]
    stored = text_format.Parse(file.read_text(), getattr(scheduler_state_pb2, type_name)())
    with pytest.raises(DataLossError):
        decode_stored(type_name, stored.SerializeToString())
