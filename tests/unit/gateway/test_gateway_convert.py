"""Tinker wire forms <-> tunemesh.v1, checked against the official SDK's own encoders and
decoders (`tinker.proto.request_conv` / `response_conv`): what the SDK sends decodes
right, what the gateway answers is what the SDK reads."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from tinker import types as tt
from tinker.proto import request_conv, response_conv
from tinker.proto import tinker_public_pb2 as tpb

from tunemesh import tensors
from tunemesh.errors import InvalidArgumentError
from tunemesh.v1 import checkpoints_pb2, sampling_pb2, training_pb2, types_pb2
from tunemesh_gateway import convert
from tunemesh_gateway.status import Unsupported

MODEL = "5d1c:train:0"


def sdk_request(data: list[tt.Datum], loss_fn: str = "cross_entropy", config=None, seq_id: int = 3,
                forward_only: bool = False) -> tpb.ForwardBackwardRequest:
    """The protobuf body the SDK sends to /forward_backward."""
    request = tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=MODEL, seq_id=seq_id)
    proto = request_conv.forward_backward_request_to_proto(request)
    proto.forward_only = forward_only
    return tpb.ForwardBackwardRequest.FromString(proto.SerializeToString())


def decoded(datum: types_pb2.Datum) -> tuple[list[int], dict[str, np.ndarray]]:
    tokens = [t for chunk in datum.model_input.chunks for t in chunk.encoded_text.tokens]
    return tokens, {k: tensors.decode(v) for k, v in datum.loss_fn_inputs.items()}


# -- paths and names ----------------------------------------------------------------

def test_tinker_paths_map_to_tunemesh_paths_and_back():
    weights = convert.TinkerPath.parse(f"tinker://{MODEL}/weights/step-2")
    sampler = convert.TinkerPath.parse(f"tinker://{MODEL}/sampler_weights/final")
    assert weights.tunemesh("runs/r1") == "tunemesh://runs/r1/state/step-2"
    assert sampler.tunemesh("runs/r1") == "tunemesh://runs/r1/sampler/final"
    assert weights.checkpoint_id == "weights/step-2"
    assert str(convert.tinker_path("tunemesh://runs/r1/state/step-2", MODEL)) == f"tinker://{MODEL}/weights/step-2"
    assert str(convert.tinker_path("tunemesh://runs/r1/sampler/auto-000007", MODEL)) == \
        f"tinker://{MODEL}/sampler_weights/auto-000007"
    imported = convert.tinker_path("tunemesh://imports/peft-1", "ignored")
    assert str(imported) == "tinker://imports/sampler_weights/peft-1"
    assert convert.TinkerPath.parse(str(imported)).tunemesh("") == "tunemesh://imports/peft-1"
    # the SDK parses what the gateway returns
    parsed = tt.ParsedCheckpointTinkerPath.from_tinker_path(str(weights))
    assert (parsed.training_run_id, parsed.checkpoint_type) == (MODEL, "training")


@pytest.mark.parametrize("path", ["tunemesh://runs/r/state/x", f"tinker://{MODEL}/weights", f"tinker://{MODEL}/x/y",
                                  "tinker://a/weights/b/c", f"tinker://{MODEL}/weights/"])
def test_malformed_tinker_paths_are_invalid_arguments(path):
    with pytest.raises(InvalidArgumentError):
        convert.TinkerPath.parse(path)


def test_external_weights_are_unsupported():
    with pytest.raises(Unsupported, match="unsupported: external_weights"):
        convert.TinkerPath.parse(f"tinker://{MODEL}/external_weights/hf")


def test_model_ids_are_what_the_sdk_builds():
    assert convert.model_id("5d1c", 0) == MODEL
    assert convert.session_name("5d1c") == "sessions/5d1c" and convert.session_id_of("sessions/5d1c") == "5d1c"
    assert convert.labels({"a": "x", "b": 3, "c": {"d": [1]}}) == {"a": "x", "b": "3", "c": '{"d": [1]}'}


# -- forward_backward request -------------------------------------------------------

def test_a_forward_backward_body_becomes_forward_backward_with_the_same_data():
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([5, 6, 7]),
                     loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [0.0, 1.0, 0.5]})
    call = convert.data_call(sdk_request([datum]), "runs/r1")
    assert isinstance(call, training_pb2.ForwardBackwardRequest)
    assert (call.run, call.seq_id, call.request_id, call.loss_fn) == ("runs/r1", 3, f"{MODEL}#3", "cross_entropy")
    tokens, inputs = decoded(call.data[0])
    assert tokens == [5, 6, 7]
    np.testing.assert_array_equal(inputs["target_tokens"], np.array([6, 7, 8], dtype=np.int64))
    np.testing.assert_array_equal(inputs["weights"], np.array([0.0, 1.0, 0.5], dtype=np.float32))


def test_forward_only_becomes_forward():
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    assert isinstance(convert.data_call(sdk_request([datum], forward_only=True), "runs/r"), training_pb2.ForwardRequest)


def test_sparse_csr_targets_and_weights_are_densified_with_zero_padding():
    """The SDK sparsifies 2-D torch targets/weights when that is smaller; tunemesh reads them dense, pad 0."""
    targets, weights = torch.zeros((2, 20), dtype=torch.int64), torch.zeros((2, 20), dtype=torch.float32)
    targets[0, 0], targets[1, 17], weights[0, 0], weights[1, 17] = 3, 9, 0.5, 2.0
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([1, 2]), loss_fn_inputs={
        "target_tokens": tt.TensorData.from_torch_sparse(targets), "weights": tt.TensorData.from_torch_sparse(weights)})
    request = sdk_request([datum])
    assert request.data[0].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"  # the SDK did sparsify
    _, inputs = decoded(convert.data_call(request, "runs/r").data[0])
    np.testing.assert_array_equal(inputs["target_tokens"], targets.numpy())
    np.testing.assert_array_equal(inputs["weights"], weights.numpy())


def test_malformed_csr_is_an_invalid_argument():
    tensor = tpb.Tensor(dtype=tpb.DTYPE_INT64, shape=[2, 3])
    tensor.sparse_csr.values = np.array([1], "<i8").tobytes()
    tensor.sparse_csr.crow_indices = np.array([0, 1, 1], "<i8").tobytes()
    tensor.sparse_csr.col_indices = np.array([3], "<i8").tobytes()  # column out of range
    with pytest.raises(InvalidArgumentError, match="sparse CSR"):
        convert.tensor_data(tensor, "t")


def test_loss_config_v2_is_preferred_and_the_legacy_map_is_read_without_it():
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([1, 2]), loss_fn_inputs={
        "target_tokens": [2, 3], "logprobs": [-1.0, -1.0], "advantages": [1.0, 1.0]})
    request = sdk_request([datum], "ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3})
    request.loss_fn_config["clip_low_threshold"] = 0.1  # a stale legacy value: v2 wins
    call = convert.data_call(request, "runs/r")
    assert {k: v.number for k, v in call.loss_fn_config.items()} == pytest.approx(
        {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3})
    del request.loss_fn_config_v2["clip_low_threshold"], request.loss_fn_config_v2["clip_high_threshold"]
    legacy = convert.data_call(request, "runs/r")
    assert legacy.loss_fn_config["clip_low_threshold"].number == pytest.approx(0.1)


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "custom"])
def test_losses_tunemesh_lacks_are_unsupported(loss_fn):
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2]})
    with pytest.raises(Unsupported, match=f"unsupported: loss_fn '{loss_fn}'"):
        convert.data_call(sdk_request([datum], loss_fn), "runs/r")


def test_image_chunks_are_unsupported():
    request = tpb.ForwardBackwardRequest(model_id=MODEL, seq_id=1, loss_fn="cross_entropy")
    request.data.add().model_input.add().image.data = b"\x89PNG"
    with pytest.raises(Unsupported, match="image chunks"):
        convert.data_call(request, "runs/r")


# -- results ------------------------------------------------------------------------

def fb_result(*per_datum: dict[str, np.ndarray], metrics=None) -> types_pb2.ForwardBackwardResult:
    return types_pb2.ForwardBackwardResult(
        outputs=[types_pb2.DatumOutput(loss_fn_outputs={k: tensors.encode(v) for k, v in d.items()}) for d in per_datum],
        metrics=metrics or {"loss:sum": 1.5})


def test_forward_backward_output_reads_back_per_datum_in_the_sdk():
    a, b = np.array([-0.5, -1.25], np.float32), np.array([-2.0, -0.25, -3.5], np.float32)
    out = convert.forward_backward_output(fb_result({"logprobs": a}, {"logprobs": b},
                                                    metrics={"loss:sum": 1.5, "num_tokens:sum": 5.0}))
    assert len(out.loss_fn_outputs) == 1  # one batched record
    read = response_conv.deserialize_forward_backward_output(out.SerializeToString())
    assert read.metrics == {"loss:sum": 1.5, "num_tokens:sum": 5.0}
    np.testing.assert_array_equal(read.loss_fn_outputs[0]["logprobs"].to_numpy(), a)
    np.testing.assert_array_equal(read.loss_fn_outputs[1]["logprobs"].to_numpy(), b)
    assert convert.forward_backward_json(out)["loss_fn_outputs"][1]["logprobs"]["data"] == b.tolist()


def test_two_dimensional_outputs_of_different_widths_become_separate_records():
    a, b = np.ones((2, 3), np.float32), np.full((1, 5), -1.0, np.float32)
    out = convert.forward_backward_output(fb_result({"logprobs": a}, {"logprobs": b}))
    assert len(out.loss_fn_outputs) == 2
    read = response_conv.deserialize_forward_backward_output(out.SerializeToString())
    assert read.loss_fn_outputs[0]["logprobs"].shape == [2, 3] and read.loss_fn_outputs[1]["logprobs"].shape == [1, 5]
    np.testing.assert_array_equal(read.loss_fn_outputs[1]["logprobs"].to_numpy(), b)


def test_sample_response_reads_back_in_the_sdk():
    seqs = [sampling_pb2.SampledSequence(tokens=[7, 8], logprobs=[-0.5, -1.0], stop_reason=sampling_pb2.STOP_REASON_STOP),
            sampling_pb2.SampledSequence(tokens=[9, 9, 9], logprobs=[-1.0, -2.0, -3.0],
                                         stop_reason=sampling_pb2.STOP_REASON_LENGTH)]
    out = convert.sample_response(seqs, [-1.5, -2.5, -3.5], prompt_len=4)
    read = response_conv.deserialize_sample_response(out.SerializeToString())
    assert [(s.stop_reason, s.tokens, s.logprobs) for s in read.sequences] == [
        ("stop", [7, 8], [-0.5, -1.0]), ("length", [9, 9, 9], [-1.0, -2.0, -3.0])]
    assert read.prompt_logprobs == [None, -1.5, -2.5, -3.5]
    body = convert.sample_json(out)
    assert body["prompt_logprobs"] == [None, -1.5, -2.5, -3.5] and body["sequences"][1]["stop_reason"] == "length"


def test_prompt_logprobs_last_n_masks_the_earlier_positions():
    padded = convert.padded_prompt_logprobs([-1.0, -2.0, -3.0, -4.0], 5, last_n=2)
    assert [None if math.isnan(v) else v for v in padded.tolist()] == [None, None, None, -3.0, -4.0]
    with pytest.raises(ValueError):
        convert.padded_prompt_logprobs([-1.0], 5, None)


@pytest.mark.parametrize("stop, strings, ids", [
    (None, [], []), ("\n\nUser:", ["\n\nUser:"], []), (["a", "b"], ["a", "b"], []), ([151645, 2], [], [151645, 2])])
def test_sampling_params_keep_the_stop_string_and_map_tinker_defaults(stop, strings, ids):
    params = convert.sampling_params(tt.SamplingParams(max_tokens=5, stop=stop, seed=11), 5)
    assert (list(params.stop), list(params.stop_token_ids)) == (strings, ids)
    assert params.top_k == 0 and params.top_p == 1.0 and params.temperature == 1.0 and params.seed == 11
    assert params.include_stop_str  # Tinker keeps the stop string in the output


def test_sample_features_tunemesh_lacks_are_unsupported():
    base = dict(prompt=tt.ModelInput.from_ints([1]), sampling_params=tt.SamplingParams(), sampling_session_id="s", seq_id=0)
    for extra, what in (({"topk_prompt_logprobs": 3}, "topk_prompt_logprobs"),
                        ({"prompt_alt_tokens_k": 2}, "prompt_alt_tokens_k"),
                        ({"sampling_params": tt.SamplingParams(stop=[])}, "stop=[]")):
        with pytest.raises(Unsupported, match=re.escape(what)):
            convert.check_sample_request(tt.SampleRequest(**{**base, **extra}))
    convert.check_sample_request(tt.SampleRequest(**base))


# -- catalog ------------------------------------------------------------------------

def test_checkpoints_and_runs_validate_as_the_sdk_types():
    ck = checkpoints_pb2.Checkpoint(path="tunemesh://runs/r1/state/s1", kind=checkpoints_pb2.CHECKPOINT_KIND_STATE,
                                    name="s1", size_bytes=10, user_metadata={"k": "v"},
                                    lora_config=types_pb2.LoraConfig(rank=8, train_attn=True))
    ck.create_time.FromSeconds(1_700_000_000)
    ck.expire_time.FromSeconds(1_700_003_600)
    parsed = tt.Checkpoint.model_validate(convert.checkpoint(ck, MODEL))
    assert (parsed.checkpoint_id, parsed.checkpoint_type, parsed.tinker_path) == (
        "weights/s1", "training", f"tinker://{MODEL}/weights/s1")
    assert parsed.user_metadata == {"k": "v"} and parsed.expires_at is not None
    run = training_pb2.TrainingRun(name="runs/r1", base_model="m", lora_config=types_pb2.LoraConfig(rank=8),
                                   owner="alice")
    run.user_metadata["renderer_name"] = "role_colon"
    run.create_time.FromSeconds(1_700_000_000)
    parsed_run = tt.TrainingRun.model_validate(convert.training_run(run, MODEL))
    assert parsed_run.user_metadata == {"renderer_name": "role_colon"} and parsed_run.lora_rank == 8
    assert parsed_run.model_owner == "alice" and parsed_run.last_request_time.timestamp() == 1_700_000_000
    run.last_request_time.FromSeconds(1_700_000_500)  # a scheduler that reports it
    assert tt.TrainingRun.model_validate(convert.training_run(run, MODEL)).last_request_time.timestamp() == \
        1_700_000_500
    info = tt.GetInfoResponse.model_validate(convert.get_info(run, MODEL))
    assert info.model_data.model_name == info.model_data.tokenizer_id == "m"
    assert tt.WeightsInfoResponse.model_validate(convert.weights_info(ck)).lora_rank == 8
