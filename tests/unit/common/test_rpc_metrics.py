"""MetricsInterceptor on a real in-process grpc.aio server: every call counted and timed
under its final status, typed errors, unexpected errors, aborts, cancellations and
streams included."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry

from tunemesh import errors
from tunemesh_common.service import rpc
from tunemesh_common.service.api_keys import KeyAuthenticator
from tunemesh_common.service.host import build_server
from tunemesh_common.service.metrics import RpcMetrics

SERVICE = "tunemesh.test.Probe"


def _handlers():
    async def ok(request: bytes, context) -> bytes:
        return b"fine"

    async def not_found(request: bytes, context) -> bytes:
        raise errors.NotFoundError("NOPE", "no such thing")

    async def crash(request: bytes, context) -> bytes:
        raise RuntimeError("bug")

    async def abort(request: bytes, context) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborts itself")

    async def slow(request: bytes, context) -> bytes:
        await asyncio.sleep(5)
        return b"late"

    async def stream(request: bytes, context):
        yield b"one"
        yield b"two"
        if request == b"fail":
            raise errors.UnavailableError("GONE", "mid-stream")

    unary = {name: grpc.unary_unary_rpc_method_handler(fn)
             for name, fn in [("Ok", ok), ("NotFound", not_found), ("Crash", crash), ("Abort", abort), ("Slow", slow)]}
    return grpc.method_handlers_generic_handler(SERVICE, {**unary, "Stream": grpc.unary_stream_rpc_method_handler(stream)})


async def _serve_and(calls, authenticator=None) -> CollectorRegistry:
    """Serve the probe with metrics on a fresh registry, run `calls(channel)`, return the registry."""
    registry = CollectorRegistry()
    server, _ = build_server(authenticator, RpcMetrics("probe", registry))
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.CHANNEL_OPTIONS) as channel:
            await calls(channel)
        await asyncio.sleep(0.2)  # cancelled handlers finish after the client gave up
    finally:
        await server.stop(None)
    return registry


async def _unary(channel, method: str, times: int = 1, timeout: float = 10, metadata=()) -> None:
    for _ in range(times):
        try:
            await channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError:
            pass


def _handled(registry: CollectorRegistry, method: str, code: str) -> float:
    labels = {"service": "probe", "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return registry.get_sample_value("tunemesh_rpc_handled_total", labels) or 0.0


def _duration_count(registry: CollectorRegistry, method: str, code: str) -> float:
    labels = {"service": "probe", "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return registry.get_sample_value("tunemesh_rpc_duration_seconds_count", labels) or 0.0


def test_calls_are_counted_by_final_status_including_typed_and_unexpected_errors():
    async def calls(channel):
        await _unary(channel, "Ok", times=3)
        await _unary(channel, "NotFound", times=2)
        await _unary(channel, "Crash")
        await _unary(channel, "Abort")

    registry = asyncio.run(_serve_and(calls))
    assert _handled(registry, "Ok", "OK") == 3
    assert _handled(registry, "NotFound", "NOT_FOUND") == 2
    assert _handled(registry, "NotFound", "UNKNOWN") == 0  # the typed error's status, not grpc's default
    assert _handled(registry, "Crash", "INTERNAL") == 1
    assert _handled(registry, "Abort", "PERMISSION_DENIED") == 1
    assert _duration_count(registry, "Ok", "OK") == 3
    assert _duration_count(registry, "NotFound", "NOT_FOUND") == 2
    in_flight = registry.get_sample_value(
        "tunemesh_rpc_in_flight", {"service": "probe", "grpc_service": SERVICE, "grpc_method": "Ok"})
    assert in_flight == 0


def test_expired_deadline_is_counted_as_deadline_exceeded_with_its_duration():
    async def calls(channel):
        await _unary(channel, "Slow", timeout=0.3)

    registry = asyncio.run(_serve_and(calls))
    assert _handled(registry, "Slow", "DEADLINE_EXCEEDED") == 1
    labels = {"service": "probe", "grpc_service": SERVICE, "grpc_method": "Slow", "grpc_code": "DEADLINE_EXCEEDED"}
    assert 0.25 <= registry.get_sample_value("tunemesh_rpc_duration_seconds_sum", labels) < 5


def test_response_streams_are_counted_when_they_end_also_with_a_mid_stream_error():
    async def calls(channel):
        method = channel.unary_stream(f"/{SERVICE}/Stream")
        assert [r async for r in method(b"", timeout=10)] == [b"one", b"two"]
        try:
            [r async for r in method(b"fail", timeout=10)]
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE

    registry = asyncio.run(_serve_and(calls))
    assert _handled(registry, "Stream", "OK") == 1
    assert _handled(registry, "Stream", "UNAVAILABLE") == 1


def test_rejected_authentication_is_counted_as_unauthenticated():
    auth = KeyAuthenticator.inline({"key-a": "tenant-a"})

    async def calls(channel):
        await _unary(channel, "Ok", metadata=(("authorization", "Bearer wrong"),))
        await _unary(channel, "Ok", metadata=(("authorization", "Bearer key-a"),))

    registry = asyncio.run(_serve_and(calls, auth))
    assert _handled(registry, "Ok", "UNAUTHENTICATED") == 1
    assert _handled(registry, "Ok", "OK") == 1


def test_health_checks_are_counted_under_the_health_service():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def calls(channel):
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

    registry = asyncio.run(_serve_and(calls))
    labels = {"service": "probe", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_code": "OK"}
    assert registry.get_sample_value("tunemesh_rpc_handled_total", labels) == 1


def test_without_metrics_the_server_counts_nothing_and_still_maps_errors():
    async def scenario():
        server, _ = build_server()
        server.add_generic_rpc_handlers((_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.CHANNEL_OPTIONS) as channel:
                await channel.unary_unary(f"/{SERVICE}/NotFound")(b"", timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == grpc.StatusCode.NOT_FOUND
