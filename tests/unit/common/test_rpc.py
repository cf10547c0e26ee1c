"""rpc.py: the error/auth interceptor on a real in-process grpc.aio server, and API-key parsing."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tunemesh import errors
from tunemesh_common.service import rpc
from tunemesh_common.service.api_keys import KeyAuthenticator, api_key_from_metadata
from tunemesh_common.service.host import build_server, mark_serving
from tunemesh_common.service.throttle import FailureThrottle
from tunemesh.errors import Code, error_from_rpc

SERVICE = "tunemesh.test.Probe"
SECRET = "s3cret-detail-that-must-not-leak"

TYPED = [
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (errors.CancelledError, grpc.StatusCode.CANCELLED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
    (errors.DataLossError, grpc.StatusCode.DATA_LOSS),
]


def _handlers(behaviour: dict):
    """Methods: Raise (raises behaviour['error']), Whoami (echoes current_tenant())."""

    async def raise_(request: bytes, context) -> bytes:
        raise behaviour["error"]

    async def whoami(request: bytes, context) -> bytes:
        return rpc.current_tenant().encode()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Raise": grpc.unary_unary_rpc_method_handler(raise_),
        "Whoami": grpc.unary_unary_rpc_method_handler(whoami),
    })


async def _call(authenticator, behaviour: dict, method: str, metadata=()):
    """Serve on loopback, make one call, return (code, details, reason, body)."""
    server, _ = build_server(authenticator)
    server.add_generic_rpc_handlers((_handlers(behaviour),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            try:
                body = await call(b"", metadata=metadata, timeout=10)
                return grpc.StatusCode.OK, "", "", body
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details(), error_from_rpc(err).reason, None
    finally:
        await server.stop(None)


def test_interceptor_maps_every_typed_error_to_its_status_and_reason():
    async def scenario():
        results = []
        for cls, _ in TYPED:
            behaviour = {"error": cls(f"REASON_{cls.__name__.upper()}", f"message of {cls.__name__}")}
            results.append(await _call(None, behaviour, "Raise"))
        return results

    for (cls, status), (code, details, reason, _) in zip(TYPED, asyncio.run(scenario())):
        assert code == status, cls
        assert details == f"message of {cls.__name__}"
        assert reason == f"REASON_{cls.__name__.upper()}"


def test_status_table_covers_every_code_by_number():
    # The interceptor looks statuses up by google.rpc number: both enumerations must agree.
    for code in Code:
        if code is Code.OK:
            continue
        assert getattr(grpc.StatusCode, code.name).value[0] == int(code)


def test_unexpected_exception_is_internal_without_traceback_or_message():
    behaviour = {"error": RuntimeError(SECRET)}
    code, details, reason, _ = asyncio.run(_call(None, behaviour, "Raise"))
    assert code == grpc.StatusCode.INTERNAL
    assert SECRET not in details
    assert "Traceback" not in details and "RuntimeError" not in details
    assert reason == ""
    assert f"/{SERVICE}/Raise" in details  # names the method for operators


AUTH = KeyAuthenticator.inline({"key-a": "tenant-a", "key-b": "tenant-b"},
                               throttle=FailureThrottle(max_failures=1000))


@pytest.mark.parametrize(
    "metadata, tenant",
    [
        ((("authorization", "Bearer key-a"),), "tenant-a"),
        ((("authorization", "bearer   key-b  "),), "tenant-b"),
        ((("x-api-key", "key-b"),), "tenant-b"),
    ],
)
def test_authenticated_calls_see_their_tenant(metadata, tenant):
    code, _, _, body = asyncio.run(_call(AUTH, {}, "Whoami", metadata))
    assert code == grpc.StatusCode.OK
    assert body == tenant.encode()


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ((), "MISSING_API_KEY"),
        ((("authorization", "Bearer "),), "MISSING_API_KEY"),
        ((("authorization", "Bearer key-c"),), "INVALID_API_KEY"),
        ((("authorization", "key-a"),), "MISSING_API_KEY"),  # no Bearer scheme
        ((("x-api-key", "nope"),), "INVALID_API_KEY"),
    ],
)
def test_bad_or_missing_keys_are_unauthenticated_with_reason(metadata, reason):
    code, _, got, _ = asyncio.run(_call(AUTH, {}, "Whoami", metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert got == reason


def test_health_is_served_without_a_key():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def scenario():
        server, health = build_server(AUTH)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await mark_serving(health, ["x.Y"])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return await stub.Check(health_pb2.HealthCheckRequest(service="x.Y"), timeout=10)
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()).status == 1  # SERVING


@pytest.mark.parametrize(
    "metadata, key",
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "BEARER  abc "}, "abc"),
        ({"x-api-key": " xyz "}, "xyz"),
        ({"authorization": "Bearer abc", "x-api-key": "xyz"}, "abc"),
        ({"authorization": "Basic dXNlcg==", "x-api-key": "xyz"}, "xyz"),
        ({"authorization": "Basic dXNlcg=="}, ""),
        ({}, ""),
    ],
)
def test_api_key_from_metadata(metadata, key):
    assert api_key_from_metadata(metadata) == key


def test_failed_keys_are_throttled_by_the_callers_address_over_a_real_server():
    """The interceptor hands the authenticator the caller's peer: after 2 bad keys from
    loopback the next call from there is refused with a retry hint, before any check;
    a key that verified before still passes."""
    auth = KeyAuthenticator.inline({"key-a": "tenant-a"}, throttle=FailureThrottle(max_failures=2, block_s=300))
    good, bad = (("authorization", "Bearer key-a"),), (("authorization", "Bearer wrong"),)

    async def scenario():
        first = await _call(auth, {}, "Whoami", good)
        failures = [await _call(auth, {}, "Whoami", bad) for _ in range(3)]
        return first, failures, await _call(auth, {}, "Whoami", good)

    first, failures, again = asyncio.run(scenario())
    assert first[0] == grpc.StatusCode.OK
    assert [f[2] for f in failures] == ["INVALID_API_KEY", "INVALID_API_KEY", "AUTH_THROTTLED"]
    assert failures[2][0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in 300 s" in failures[2][1]
    assert again[0] == grpc.StatusCode.OK and again[3] == b"tenant-a"
    assert list(auth.throttle._sources) == ["ipv4:127.0.0.1"]  # the port is not part of the source
