"""Tinker's names in tunemesh: errors, result_async, LossFnType, StopReason, image chunks,
provenance spans and ParsedCheckpointTinkerPath."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import typing

import grpc
import pytest
from sdk_fakes import FakeChannel, FakeRpcError
from training_fakes import FAST, FakeMesh, submitted

import tunemesh
from tunemesh import _wire, sampling_client
from tunemesh.errors import error_for
from tunemesh.futures import APIFuture
from tunemesh_common.training.loss_specs import SPECS

# (status code, the Tinker name that must catch it, the tunemesh class raised)
TINKER_NAMES = [
    (grpc.StatusCode.INVALID_ARGUMENT, "BadRequestError", tunemesh.InvalidArgumentError),
    (grpc.StatusCode.UNAUTHENTICATED, "AuthenticationError", tunemesh.UnauthenticatedError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimitError", tunemesh.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, "APIConnectionError", tunemesh.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "APITimeoutError", tunemesh.DeadlineExceededError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "APIConnectionError", tunemesh.DeadlineExceededError),
    (grpc.StatusCode.NOT_FOUND, "NotFoundError", tunemesh.NotFoundError),
    (grpc.StatusCode.PERMISSION_DENIED, "PermissionDeniedError", tunemesh.PermissionDeniedError),
]
CONNECTION_NAMES = {"APIConnectionError", "APITimeoutError"}
NO_RETRY = tunemesh.RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.001, total_timeout_s=0.05)


@pytest.mark.parametrize(("code", "name", "cls"), TINKER_NAMES, ids=lambda v: getattr(v, "name", None))
def test_the_error_of_each_code_is_caught_by_its_tinker_name(code, name, cls):
    err = error_for(code, "SOME_REASON", "message")
    assert type(err) is cls
    for caught_by in (name, "TinkerError", "APIError"):
        with pytest.raises(getattr(tunemesh, caught_by)):
            raise err
    others = {n for _, n, _ in TINKER_NAMES} - {name} - (CONNECTION_NAMES if name in CONNECTION_NAMES else set())
    assert not [n for n in others if isinstance(err, getattr(tunemesh, n))]
    assert (err.code, err.reason, err.message) == (code, "SOME_REASON", "message")


@pytest.mark.parametrize(("code", "name", "cls"), TINKER_NAMES[:5], ids=lambda v: getattr(v, "name", None))
def test_a_failed_call_raises_what_its_tinker_name_catches(code, name, cls):
    def refuse(request, metadata):
        raise FakeRpcError(code, "refused", reason="SOME_REASON")

    with tunemesh.ServiceClient("fake:1", "k", retry_policy=NO_RETRY,
                                channel=FakeChannel({"GetCapabilities": refuse})) as service:
        with pytest.raises(getattr(tunemesh, name)) as raised:
            service.get_server_capabilities()
    assert type(raised.value) is cls and raised.value.reason == "SOME_REASON"


def test_raising_a_tinker_name_raises_the_tunemesh_error():
    err = tunemesh.BadRequestError("BAD", "no")
    assert type(err) is tunemesh.InvalidArgumentError and err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert tunemesh.TinkerError is tunemesh.APIError is tunemesh.TunemeshError


def test_result_async_returns_the_result_and_raises_the_typed_error():
    async def main():
        done, failing = APIFuture(), APIFuture()
        threading.Timer(0.02, done._set_result, (5,)).start()
        threading.Timer(0.02, failing._set_exception, (tunemesh.InvalidArgumentError("BAD", "x"),)).start()
        value = await done.result_async()
        with pytest.raises(tunemesh.BadRequestError):
            await failing.result_async(timeout=5)
        return value

    assert asyncio.run(main()) == 5


def test_result_async_timeout_leaves_the_call_running():
    async def main():
        future = APIFuture()
        with pytest.raises(TimeoutError):
            await future.result_async(timeout=0.01)
        assert not future.done() and not future.future().cancelled()
        threading.Timer(0.02, future._set_result, ("late",)).start()
        return await future.result_async(timeout=5)

    assert asyncio.run(main()) == "late"


def test_loss_fn_type_is_the_services_loss_catalogue():
    assert set(typing.get_args(tunemesh.types.LossFnType)) == set(SPECS)


def test_stop_reason_names_what_the_sampler_reports():
    assert typing.get_args(tunemesh.StopReason) == ("length", "stop")
    assert set(sampling_client._STOP_REASONS.values()) == set(typing.get_args(tunemesh.StopReason))


IMAGES = [
    tunemesh.types.ImageChunk(b"\x89PNG", "png", expected_tokens=4),
    tunemesh.types.ImageAssetPointerChunk("jpeg", "s3://bucket/cat.jpg", expected_tokens=4),
]


@pytest.mark.parametrize("image", IMAGES, ids=lambda c: type(c).__name__)
def test_a_model_input_with_an_image_is_built_but_not_sent(image):
    model_input = tunemesh.ModelInput.from_ints([1, 2]).append(image)
    assert model_input.length == 6 and isinstance(image, typing.get_args(tunemesh.ModelInputChunk))
    with pytest.raises(ValueError, match="text chunks only"):
        model_input.to_ints()
    with pytest.raises(tunemesh.BadRequestError, match=type(image).__name__) as raised:
        _wire.model_input_to_proto(model_input)
    assert raised.value.reason == _wire.UNSUPPORTED_CHUNK
    with pytest.raises(ValueError, match="expected_tokens"):
        _ = dataclasses.replace(image, expected_tokens=None).length


def test_sampling_an_image_prompt_fails_before_any_call():
    channel = FakeChannel({})
    sampler = sampling_client.SamplingClient(_transport_over(channel), "sampling_sessions/s", "m", "")
    with pytest.raises(tunemesh.InvalidArgumentError, match="ImageChunk"):
        sampler.sample(tunemesh.ModelInput([IMAGES[0]]))
    assert channel.calls == []


def _transport_over(channel):
    from tunemesh.transport import Transport

    return Transport(channel, "k", FAST)


def _datum() -> tunemesh.Datum:
    return tunemesh.Datum(tunemesh.ModelInput.from_ints([1, 2, 3]),
                          {"target_tokens": [2, 3, 4], "weights": [0, 1, 1]})


SPANS_IN = [tunemesh.PromptProvenanceSpan(sequence_id="s1", length=2),
            tunemesh.SampledProvenanceSpan(sequence_id="s1", length=1)]
SPANS_OUT = [tunemesh.PromptProvenanceSpan(sequence_id="s1", offset=1, length=1),
             tunemesh.SampledProvenanceSpan(sequence_id="s1", length=2)]


def test_provenance_is_checked_and_kept_by_replace():
    datum = _datum().with_provenance(model_input=SPANS_IN, loss_fn_inputs=SPANS_OUT)
    assert datum.model_input_spans == SPANS_IN and datum.loss_fn_input_spans == SPANS_OUT
    trimmed = dataclasses.replace(datum, loss_fn_inputs={"target_tokens": [2, 3, 4]})
    assert trimmed.loss_fn_input_spans == SPANS_OUT
    with pytest.raises(ValueError, match="loss_fn_inputs spans cover 6 positions, but it has 3"):
        _datum().with_provenance(model_input=SPANS_IN, loss_fn_inputs=SPANS_IN[:1] * 3)
    with pytest.raises(ValueError, match="pair"):
        tunemesh.Datum(tunemesh.ModelInput.from_ints([1]), model_input_spans=SPANS_IN)
    with pytest.raises(ValueError, match="sequence_id"):
        tunemesh.SampledProvenanceSpan(sequence_id="", length=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPANS_IN[0].length = 5


def test_a_datum_with_provenance_is_sent_as_the_same_datum_without_it():
    mesh = FakeMesh()
    channel = FakeChannel(mesh.handlers)
    with tunemesh.ServiceClient("fake:1", "k", retry_policy=FAST, channel=channel) as service:
        trainer = service.create_lora_training_client("m")
        datum = _datum().with_provenance(model_input=SPANS_IN, loss_fn_inputs=SPANS_OUT)
        trainer.forward_backward([datum], "cross_entropy").result(timeout=5)
        trainer.forward_backward([_datum()], "cross_entropy").result(timeout=5)
        first, second = submitted(channel)
        assert (first.seq_id, second.seq_id) == (1, 2) and list(first.data) == list(second.data)


@pytest.mark.parametrize("path", [
    "tinker://run-1/weights/step-10",
    "tinker://abc:train:0/sampler_weights/final",
    "tinker://imports/sampler_weights/mine",
    "tinker://run-1/external_weights/x",
])
def test_tinker_paths_parse_as_tinkers_sdk_parses_them(path):
    tinker_types = pytest.importorskip("tinker.types")
    ours = tunemesh.ParsedCheckpointTinkerPath.from_tinker_path(path)
    theirs = tinker_types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert dataclasses.asdict(ours) == theirs.model_dump()


@pytest.mark.parametrize("path", ["tinker://a/b", "tinker://a/checkpoints/c", "s3://a/weights/b",
                                  "tinker://a/weights/b/c", "tunemesh://runs/r/other/x", "tunemesh://x"])
def test_malformed_paths_raise_value_error(path):
    with pytest.raises(ValueError, match="Invalid tinker path"):
        tunemesh.ParsedCheckpointTinkerPath.from_tinker_path(path)


@pytest.mark.parametrize(("path", "run_id", "kind", "checkpoint_id", "tunemesh_path"), [
    ("tunemesh://runs/r1/state/s", "runs/r1", "training", "weights/s", "tunemesh://runs/r1/state/s"),
    ("tunemesh://runs/r1/sampler/s", "runs/r1", "sampler", "sampler_weights/s", "tunemesh://runs/r1/sampler/s"),
    ("tunemesh://imports/a", "imports", "sampler", "sampler_weights/a", "tunemesh://imports/a"),
    ("tinker://r1/weights/s", "r1", "training", "weights/s", "tunemesh://runs/r1/state/s"),
    ("tinker://imports/sampler_weights/a", "imports", "sampler", "sampler_weights/a", "tunemesh://imports/a"),
])
def test_paths_map_between_tinker_and_tunemesh(path, run_id, kind, checkpoint_id, tunemesh_path):
    parsed = tunemesh.ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert (parsed.tinker_path, parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id) == (
        path, run_id, kind, checkpoint_id)
    assert parsed.tunemesh_path == tunemesh_path


def test_external_weights_have_no_tunemesh_path():
    parsed = tunemesh.ParsedCheckpointTinkerPath.from_tinker_path("tinker://r/external_weights/x")
    with pytest.raises(ValueError, match="external_weights"):
        _ = parsed.tunemesh_path
