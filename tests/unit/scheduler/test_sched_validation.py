"""validation.py: each rule rejects with INVALID_ARGUMENT (or the documented code) and its reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunemesh.v1 import sessions_pb2, types_pb2
from tunemesh import tensors
from tunemesh.errors import Code, InvalidArgumentError, TunemeshError
from tunemesh_common.training import datum_rules
from tunemesh_scheduler import validation

VOCAB = 100
DENSE = sessions_pb2.SupportedModel(name="tiny", family="dense", vocab_size=VOCAB, max_seq_len=16, max_lora_rank=64)
MOE = sessions_pb2.SupportedModel(name="tiny-moe", family="moe", vocab_size=VOCAB, max_seq_len=16, max_lora_rank=64)
LIMITS = validation.Limits(max_datums=4, max_tokens=20)


def datum(tokens, targets=None, weights=None, **extra) -> types_pb2.Datum:
    """A Datum; targets default to tokens shifted by one, weights omitted unless given."""
    d = types_pb2.Datum()
    if tokens is not None:
        d.model_input.chunks.add().encoded_text.tokens.extend(tokens)
    if targets is None:
        targets = np.asarray(list(tokens[1:]) + [0], dtype=np.int64)
    if not (isinstance(targets, str) and targets == "omit"):
        d.loss_fn_inputs["target_tokens"].CopyFrom(_tensor(targets))
    if weights is not None:
        d.loss_fn_inputs["weights"].CopyFrom(_tensor(weights))
    for key, value in extra.items():
        d.loss_fn_inputs[key].CopyFrom(_tensor(value))
    return d


def _tensor(value) -> types_pb2.TensorData:
    return value if isinstance(value, types_pb2.TensorData) else tensors.encode(np.asarray(value))


def check(data, loss_fn="cross_entropy", model=DENSE, limits=LIMITS) -> int:
    return validation.check_data(data, loss_fn, model, limits)


def rejected(fn, *args, reason: str, code: Code = Code.INVALID_ARGUMENT, where: str = "") -> TunemeshError:
    with pytest.raises(TunemeshError) as info:
        fn(*args)
    assert (info.value.rpc_code, info.value.reason) == (code, reason), info.value
    assert where in info.value.message
    return info.value


# ---- data ------------------------------------------------------------------------------


def test_valid_payload_returns_its_token_count():
    data = [datum([1, 2, 3]), datum([4, 5], weights=np.float32([1.0, 0.5])), datum([9] * 10)]
    assert check(data) == 15


def test_two_dimensional_targets_with_matching_weights_are_accepted():
    targets = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    assert check([datum([7, 8, 9], targets=targets, weights=np.ones((3, 2), np.float32))]) == 3
    assert check([datum([7, 8, 9], targets=targets.astype(np.int32))]) == 3


def test_empty_data():
    rejected(check, [], reason="EMPTY_DATA")


def test_too_many_datums():
    rejected(check, [datum([1])] * (LIMITS.max_datums + 1), reason="REQUEST_TOO_LARGE")
    assert check([datum([1])] * LIMITS.max_datums) == LIMITS.max_datums


def test_too_many_tokens_in_total():
    rejected(check, [datum([1] * 10), datum([1] * 10), datum([1])], reason="REQUEST_TOO_LARGE")
    assert check([datum([1] * 10), datum([1] * 10)]) == 20


def test_sequence_longer_than_the_model_accepts():
    wide = validation.Limits(4, 1000)
    rejected(check, [datum([1] * 17)], "cross_entropy", DENSE, wide, reason="SEQUENCE_TOO_LONG")
    assert check([datum([1] * 16)], "cross_entropy", DENSE, wide) == 16


def test_datum_without_tokens():
    rejected(check, [datum([1]), datum([], targets=np.zeros(0, np.int64))], reason="EMPTY_INPUT", where="data[1]")


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 5, -1, -(2**31)])
def test_input_token_out_of_range(bad):
    err = rejected(check, [datum([1, bad, 2], targets=np.int64([1, 2, 3]))], reason="TOKEN_OUT_OF_RANGE")
    assert "model_input" in err.message and "position 1" in err.message


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_target_token_out_of_range(bad):
    err = rejected(check, [datum([1, 2, 3], targets=np.int64([1, 2, bad]))], reason="TOKEN_OUT_OF_RANGE")
    assert "target_tokens" in err.message


def test_target_out_of_range_in_two_dimensional_targets():
    targets = np.array([[1, 2], [3, VOCAB]], dtype=np.int64)
    rejected(check, [datum([1, 2], targets=targets)], reason="TOKEN_OUT_OF_RANGE", where="target_tokens")


def test_missing_targets():
    rejected(check, [datum([1, 2], targets="omit")], reason="MISSING_LOSS_INPUT")


def test_unknown_loss_input_key():
    rejected(check, [datum([1, 2], advantages=np.float32([1, 2]))], reason="UNKNOWN_LOSS_INPUT")


@pytest.mark.parametrize(
    "targets",
    [
        np.int64([1, 2]),  # shorter than model_input
        np.int64([1, 2, 3, 4]),  # longer
        np.int64([[1, 2], [3, 4]]),  # 2-D with the wrong first dimension
        np.zeros((3, 1, 1), np.int64),  # 3-D
        np.int64(5),  # scalar
    ],
)
def test_target_shape_must_match_model_input(targets):
    rejected(check, [datum([1, 2, 3], targets=targets)], reason="SHAPE_MISMATCH", where="target_tokens")


def test_weights_shape_must_match_targets():
    targets = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    rejected(check, [datum([7, 8, 9], targets=targets, weights=np.ones(3, np.float32))], reason="SHAPE_MISMATCH")
    rejected(check, [datum([7, 8, 9], weights=np.ones(2, np.float32))], reason="SHAPE_MISMATCH")


def test_target_dtype_must_be_integer():
    rejected(check, [datum([1, 2], targets=np.float32([1, 2]))], reason="BAD_DTYPE", where="target_tokens")


def test_weights_dtype_must_be_float():
    rejected(check, [datum([1, 2], weights=np.int64([1, 1]))], reason="BAD_DTYPE", where="weights")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(bad):
    rejected(check, [datum([1, 2], weights=np.float32([1, bad]))], reason="NON_FINITE_INPUT", where="weights")


def test_malformed_tensor_bytes():
    broken = types_pb2.TensorData(dtype=types_pb2.DTYPE_FLOAT32, shape=[2], data=b"\x00" * 5)
    rejected(check, [datum([1, 2], weights=broken)], reason="BAD_TENSOR", where="weights")


def test_non_text_chunk():
    d = datum([1, 2])
    d.model_input.chunks.add()  # a chunk with no member set
    rejected(check, [d], reason="UNSUPPORTED_CHUNK")


def test_tokens_span_chunks():
    d = datum([1, 2], targets=np.int64([1, 2, 3, 4]))
    d.model_input.chunks.add().encoded_text.tokens.extend([3, 4])
    assert check([d]) == 4


def test_the_failing_datum_is_named():
    rejected(check, [datum([1]), datum([1]), datum([1, VOCAB])], reason="TOKEN_OUT_OF_RANGE", where="data[2]")


# ---- loss ------------------------------------------------------------------------------


def test_unknown_loss():
    rejected(validation.check_loss, "ppo_v9", {}, reason="UNKNOWN_LOSS")


def test_unknown_loss_config_key():
    config = {"clip": types_pb2.LossConfigValue(number=0.2)}
    rejected(validation.check_loss, "cross_entropy", config, reason="UNKNOWN_LOSS_CONFIG")


def test_known_loss_without_config_passes():
    validation.check_loss("cross_entropy", {})


def _rl(tokens, **overrides):
    n = len(tokens)
    inputs = {"logprobs": np.float32([-1.0] * n), "advantages": np.float32([0.5] * n)}
    inputs.update(overrides)
    return datum(tokens, **{k: v for k, v in inputs.items() if v is not None})


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_rl_losses_accept_sampler_logprobs_advantages_and_a_mask(loss_fn):
    assert check([_rl([1, 2, 3]), _rl([4, 5], weights=np.float32([0.0, 1.0]))], loss_fn) == 5


@pytest.mark.parametrize("missing", ["logprobs", "advantages"])
def test_rl_loss_without_a_required_input(missing):
    rejected(check, [_rl([1, 2, 3], **{missing: None})], "ppo", reason="MISSING_LOSS_INPUT", where=missing)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_advantages_are_refused(bad):
    rejected(check, [_rl([1, 2]), _rl([1, 2, 3], advantages=np.float32([0.1, bad, 0.2]))], "importance_sampling",
             reason="NON_FINITE_INPUT", where="data[1].loss_fn_inputs['advantages']")


def test_rl_inputs_must_match_the_targets_shape():
    rejected(check, [_rl([1, 2, 3], logprobs=np.float32([-1.0, -1.0]))], "cispo", reason="SHAPE_MISMATCH")
    two_d = np.int64([[1, 2], [2, 3], [3, 4]])
    rejected(check, [datum([1, 2, 3], targets=two_d, logprobs=np.float32([-1.0] * 3),
                           advantages=np.float32([1.0] * 3))], "dro", reason="SHAPE_MISMATCH")


def test_rl_loss_config_is_checked_and_defaulted():
    number = types_pb2.LossConfigValue
    assert validation.check_loss("ppo", {"clip_low_threshold": number(number=0.7)}) == {
        "clip_low_threshold": 0.7, "clip_high_threshold": 1.2}
    rejected(validation.check_loss, "ppo", {"clip_low_threshold": number(number=2.0)}, reason="BAD_LOSS_CONFIG")
    rejected(validation.check_loss, "dro", {"beta": number(text="0.1")}, reason="BAD_LOSS_CONFIG")
    rejected(validation.check_loss, "dro", {"beta": number(number=math.nan)}, reason="NON_FINITE_INPUT")


# ---- optimizer -------------------------------------------------------------------------


def test_adam_typical_values_pass():
    validation.check_adam(types_pb2.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12))


@pytest.mark.parametrize(
    "params",
    [
        dict(learning_rate=-1e-4),
        dict(learning_rate=math.nan),
        dict(learning_rate=math.inf),
        dict(beta1=1.0),
        dict(beta2=1.5),
        dict(eps=0.0),  # every zero-gradient coordinate would become NaN
        dict(beta1=-0.1),
        dict(eps=-1e-8),
        dict(weight_decay=math.nan),
        dict(grad_clip_norm=-1.0),
    ],
)
def test_bad_adam_params(params):
    err = rejected(validation.check_adam, types_pb2.AdamParams(**params), reason="BAD_OPTIMIZER_PARAM")
    assert next(iter(params)) in err.message


# ---- LoRA ------------------------------------------------------------------------------


def lora(**kw) -> types_pb2.LoraConfig:
    base = dict(train_attn=True, train_mlp=True, train_unembed=True)
    return types_pb2.LoraConfig(**(base | kw))


@pytest.mark.parametrize("rank", [1, 8, 64, 0])
def test_lora_rank_within_bounds(rank):
    validation.check_lora(lora(rank=rank), DENSE)


@pytest.mark.parametrize("rank", [65, -1, 1000])
def test_lora_rank_out_of_bounds(rank):
    rejected(validation.check_lora, lora(rank=rank), DENSE, reason="BAD_LORA_RANK")


def test_default_rank_must_fit_the_model():
    small = sessions_pb2.SupportedModel(name="s", family="dense", vocab_size=10, max_seq_len=8, max_lora_rank=16)
    rejected(validation.check_lora, lora(rank=0), small, reason="BAD_LORA_RANK")


@pytest.mark.parametrize("alpha", [-1.0, math.nan, math.inf])
def test_bad_lora_alpha(alpha):
    rejected(validation.check_lora, lora(rank=8, alpha=alpha), DENSE, reason="BAD_LORA_ALPHA")


def test_no_lora_targets():
    config = types_pb2.LoraConfig(rank=8, train_experts=True)
    rejected(validation.check_lora, config, DENSE, reason="NO_LORA_TARGETS")


def test_train_experts_is_a_target_on_moe_and_ignored_on_dense():
    validation.check_lora(lora(train_experts=True), MOE)
    validation.check_lora(types_pb2.LoraConfig(rank=8, train_experts=True), MOE)  # experts alone
    validation.check_lora(lora(train_experts=True), DENSE)
    validation.check_lora(lora(), MOE)


def test_normalized_lora_fills_defaults_and_drops_experts_on_dense():
    n = validation.normalized_lora(lora(train_experts=True, seed=7, train_mlp=False), DENSE)
    assert (n.rank, n.alpha, n.train_experts, n.seed) == (32, 32.0, False, 7)
    assert (n.train_attn, n.train_mlp, n.train_unembed) == (True, False, True)
    n = validation.normalized_lora(lora(rank=8), DENSE)
    assert (n.rank, n.alpha) == (8, 8.0)
    n = validation.normalized_lora(lora(rank=8, alpha=3.5, train_experts=True), MOE)
    assert (n.rank, n.alpha, n.train_experts) == (8, 3.5, True)


def test_normalized_lora_leaves_the_request_alone():
    request = lora(train_experts=True)
    validation.normalized_lora(request, DENSE)
    assert (request.rank, request.alpha, request.train_experts) == (0, 0.0, True)


def test_two_dimensional_targets_are_capped_in_k():
    n, k = 3, datum_rules.MAX_TARGETS_PER_POSITION + 1
    targets = np.zeros((n, k), dtype=np.int64)
    data = [types_pb2.Datum(
        model_input=types_pb2.ModelInput(chunks=[types_pb2.ModelInputChunk(
            encoded_text=types_pb2.EncodedTextChunk(tokens=[1, 2, 3]))]),
        loss_fn_inputs={"target_tokens": tensors.encode(targets)},
    )]
    model = sessions_pb2.SupportedModel(name="m", vocab_size=10, max_seq_len=16, max_lora_rank=8)
    with pytest.raises(InvalidArgumentError) as err:
        validation.check_data(data, "cross_entropy", model, validation.Limits(max_datums=4, max_tokens=64))
    assert err.value.reason == "TOO_MANY_TARGETS"
