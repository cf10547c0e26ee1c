"""Errors on the wire: the server interceptor (rpc.ErrorInterceptor) on a real grpc.aio server
sends the standard rich status, and the one decoder (tunemesh.errors.error_from_rpc, under
rpc.error_from_peer too) gives back the same class, reason and message."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tunemesh import errors
from tunemesh.errors import error_from_rpc
from tunemesh_common.service import rpc

SERVICE = "tunemesh.test.Status"
SECRET = "s3cret-detail-that-must-not-leak"
CLASSES = [cls for cls in errors.TunemeshError.__subclasses__() if cls is not errors.ClientClosedError]


def _handlers(error: BaseException):
    async def unary(request: bytes, context) -> bytes:
        raise error

    async def stream(request: bytes, context):
        yield b"first"
        raise error

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    })


async def _fail(error: BaseException, method: str = "Unary", sync: bool = False, options=()) -> grpc.RpcError:
    """Serve `error` from `method` on 127.0.0.1:0 behind the interceptor; the client's RpcError."""
    server = grpc.aio.server(interceptors=[rpc.ErrorInterceptor()], options=list(options) or rpc.SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(error),))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        if sync:  # the SDK's client: a plain grpc channel
            return await asyncio.to_thread(_sync_call, target, method)
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                if method == "Unary":
                    await channel.unary_unary(f"/{SERVICE}/Unary")(b"x" * 64, timeout=10)
                else:
                    async for _ in channel.unary_stream(f"/{SERVICE}/Stream")(b"", timeout=10):
                        pass
            return info.value
    finally:
        await server.stop(None)


def _sync_call(target: str, method: str) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=10)
    return info.value


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_round_trips_with_its_reason_and_message(cls):
    sent = cls("SOME_REASON", "token 7 is über the vocabulary: 5 ≥ 4")
    err = asyncio.run(_fail(sent))
    got = error_from_rpc(err)
    assert type(got) is cls and got.code == sent.code == err.code()
    assert (got.reason, got.message) == (sent.reason, sent.message)
    peer = rpc.error_from_peer(err, "trainer n1")  # a tunemesh error passes through as it is
    assert (type(peer), peer.reason, peer.message) == (cls, sent.reason, sent.message)


def test_the_wire_form_is_the_standard_rich_status():
    err = asyncio.run(_fail(errors.NotFoundError("RUN_NOT_FOUND", "run runs/x not found")))
    status = rpc_status.from_call(err)  # google.rpc.Status in grpc-status-details-bin
    assert (status.code, status.message) == (grpc.StatusCode.NOT_FOUND.value[0], "run runs/x not found")
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and (info.reason, info.domain) == ("RUN_NOT_FOUND", "tunemesh")
    assert {key for key, _ in err.trailing_metadata()} == {"grpc-status-details-bin"}


def test_the_sdks_sync_client_decodes_the_same():
    err = asyncio.run(_fail(errors.FailedPreconditionError("SEQ_ID_GAP", ""), sync=True))
    got = error_from_rpc(err)
    assert (type(got), got.reason, got.message) == (errors.FailedPreconditionError, "SEQ_ID_GAP", "")


def test_an_error_in_the_middle_of_a_response_stream_keeps_its_reason():
    err = asyncio.run(_fail(errors.DataLossError("CHECKSUM_MISMATCH", "file a: sha256 differs"), "Stream"))
    got = error_from_rpc(err)
    assert (type(got), got.reason, got.message) == (errors.DataLossError, "CHECKSUM_MISMATCH", "file a: sha256 differs")


def test_an_unexpected_exception_is_internal_without_reason_or_traceback():
    err = asyncio.run(_fail(RuntimeError(SECRET)))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in err.details() and "Traceback" not in err.details()
    assert rpc_status.from_call(err) is None  # no rich status: nothing of the exception leaves
    got = error_from_rpc(err)
    assert (type(got), got.reason) == (errors.InternalError, "")
    peer = rpc.error_from_peer(err, "sampler s1")
    assert (type(peer), peer.reason) == (errors.InternalError, "PEER_ERROR") and "sampler s1" in peer.message
    assert rpc.error_from_peer(err, "trainer t", failure_reason="TRAINER_ERROR").reason == "TRAINER_ERROR"


def test_grpcs_own_refusal_of_a_request_over_the_size_limit_is_request_too_large():
    err = asyncio.run(_fail(AssertionError("never reached"), options=[("grpc.max_receive_message_length", 16)]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    got = error_from_rpc(err)
    assert (type(got), got.reason) == (errors.InvalidArgumentError, errors.REQUEST_TOO_LARGE)
    assert "64 bytes" in got.message and "16 bytes" in got.message


def test_a_peer_that_does_not_answer_is_unavailable():
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def call_nobody():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE}/Unary")(b"", timeout=5)
        return info.value

    peer = rpc.error_from_peer(asyncio.run(call_nobody()), "checkpoint service")
    assert (type(peer), peer.reason) == (errors.UnavailableError, "PEER_UNAVAILABLE")
    assert peer.message.startswith("checkpoint service: UNAVAILABLE")


def test_construction_positional_reason_and_message_keyword_code():
    err = errors.InvalidArgumentError("BAD_TOKEN", "token 7 is out of range")
    assert (err.code, err.rpc_code, err.reason, err.message) == (
        grpc.StatusCode.INVALID_ARGUMENT, errors.Code.INVALID_ARGUMENT, "BAD_TOKEN", "token 7 is out of range")
    assert str(err) == "INVALID_ARGUMENT [BAD_TOKEN]: token 7 is out of range"
    assert errors.NotFoundError(reason="RUN_NOT_FOUND").message == ""
    other = errors.TunemeshError("ODD", "", code=errors.Code.OUT_OF_RANGE)
    assert other.code == grpc.StatusCode.OUT_OF_RANGE and "code=grpc.StatusCode.OUT_OF_RANGE" in repr(other)
    assert errors.error_for(errors.Code.DATA_LOSS, "R", "m").__class__ is errors.DataLossError
