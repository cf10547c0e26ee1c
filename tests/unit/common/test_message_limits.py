"""Per-RPC request limits (`rpc.MessageLimits`) on a real grpc.aio server on loopback: a
request over its method's limit is refused RESOURCE_EXHAUSTED [REQUEST_TOO_LARGE] without
being decoded, after authentication; the next call on the same channel is served."""

from __future__ import annotations

import asyncio

import grpc

from tunemesh.errors import UnauthenticatedError, error_from_rpc
from tunemesh.retry import FINAL_REASONS
from tunemesh_common.service import rpc
from tunemesh_common.service.host import build_server

SERVICE = "tunemesh.test.Limits"


def _serve(decoded: list[int], authenticator=None) -> grpc.aio.Server:
    def decode(raw: bytes) -> bytes:
        decoded.append(len(raw))
        return raw

    async def echo(request: bytes, context) -> bytes:
        return str(len(request)).encode()

    def handler():
        return grpc.unary_unary_rpc_method_handler(echo, request_deserializer=decode)

    server, _ = build_server(authenticator, limits=rpc.MessageLimits({f"/{SERVICE}/Big": 1 << 20}, default=1024))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Big": handler(),
                                                                                    "Small": handler()}),))
    return server


async def _calls(decoded: list[int], calls: list[tuple[str, int]], authenticator=None) -> list[str]:
    server = _serve(decoded, authenticator)  # on the running loop
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    answers = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=rpc.CHANNEL_OPTIONS) as channel:
            for method, size in calls:
                try:
                    answers.append((await channel.unary_unary(f"/{SERVICE}/{method}")(b"x" * size, timeout=10)).decode())
                except grpc.aio.AioRpcError as err:
                    answers.append(f"{err.code().name} {error_from_rpc(err).reason}: {err.details()}")
    finally:
        await server.stop(None)
    return answers


def test_each_method_has_its_limit_and_an_oversized_request_is_never_decoded():
    decoded: list[int] = []
    answers = asyncio.run(_calls(decoded, [("Small", 1024), ("Small", 1025), ("Small", 10),
                                                   ("Big", 5000), ("Big", (1 << 20) + 1), ("Big", 7)]))
    assert answers[0] == "1024" and answers[2] == "10" and answers[3] == "5000" and answers[5] == "7"
    assert answers[1] == ("RESOURCE_EXHAUSTED REQUEST_TOO_LARGE: Small takes requests of at most 1024 bytes; "
                          "this one has 1025")
    assert answers[4].startswith("RESOURCE_EXHAUSTED REQUEST_TOO_LARGE: Big takes requests of at most 1048576")
    assert decoded == [1024, 10, 5000, 7]  # the two oversized ones were refused from their length
    assert "REQUEST_TOO_LARGE" in FINAL_REASONS  # the SDK reports it at once, no retry


def test_an_unauthenticated_oversized_request_is_unauthenticated():
    def refuse(metadata, peer):
        raise UnauthenticatedError("BAD_API_KEY", "no such key")

    decoded: list[int] = []
    (answer,) = asyncio.run(_calls(decoded, [("Small", 4096)], refuse))
    assert answer.startswith("UNAUTHENTICATED BAD_API_KEY") and decoded == []


def test_the_scheduler_table_keeps_training_data_at_the_server_limit():
    from tunemesh_scheduler.__main__ import SMALL_REQUEST_BYTES, request_limits

    limits = request_limits(64 << 20)
    assert limits.of("/tunemesh.v1.TrainingService/ForwardBackward") == 64 << 20
    assert limits.of("/tunemesh.v1.TrainingService/Forward") == 64 << 20
    assert limits.of("/tunemesh.v1.SamplingService/Sample") == 4 << 20
    assert limits.of("/tunemesh.v1.SessionService/CreateSession") == SMALL_REQUEST_BYTES
