"""The refusal handshake of client-streamed uploads (tunemesh_common.checkpoints.uploads)
on a real grpc.aio channel: a server refusing mid-stream while the client still writes
always reaches the client as its typed status (without the handshake, grpc.aio ends some
of these calls INTERNAL "Internal error from Core")."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tunemesh.errors import InvalidArgumentError, TunemeshError
from tunemesh_common.checkpoints.uploads import refusals_after_drain, send_upload

CALLS = 100


def _identity(raw: bytes) -> bytes:
    return raw


async def _refuse_second(requests, context):
    try:
        async with refusals_after_drain(context, requests):
            count = 0
            async for _ in requests:
                count += 1
                if count == 2:
                    raise InvalidArgumentError("BAD_UPLOAD", "refused")
            return b"ok"
    except TunemeshError as err:
        await context.abort(err.code, err.reason)


async def _calls(feed_pause_s: float) -> list[tuple[grpc.StatusCode, str]]:
    server = grpc.aio.server()
    handler = grpc.stream_unary_rpc_method_handler(_refuse_second, _identity, _identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Upload", {"Put": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        put = channel.stream_unary("/t.Upload/Put", request_serializer=_identity, response_deserializer=_identity)

        async def requests():
            for _ in range(6):
                yield b"x" * 1024
                await asyncio.sleep(feed_pause_s)

        for _ in range(CALLS):
            try:
                await send_upload(put(), requests())
                outcomes.append((grpc.StatusCode.OK, ""))
            except grpc.aio.AioRpcError as err:
                outcomes.append((err.code(), err.details()))
    await server.stop(None)
    return outcomes


@pytest.mark.parametrize("feed_pause_s", [0.0, 0.0005, 0.002])
def test_a_refusal_mid_stream_always_reaches_the_client_typed(feed_pause_s):
    outcomes = asyncio.run(_calls(feed_pause_s))
    assert set(outcomes) == {(grpc.StatusCode.INVALID_ARGUMENT, "BAD_UPLOAD")}


def test_an_accepted_upload_returns_the_response():
    async def accept(requests, context):
        async with refusals_after_drain(context, requests):
            return b"%d" % sum([len(r) async for r in requests])

    async def run() -> bytes:
        server = grpc.aio.server()
        handler = grpc.stream_unary_rpc_method_handler(accept, _identity, _identity)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Upload", {"Put": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            put = channel.stream_unary("/t.Upload/Put", request_serializer=_identity, response_deserializer=_identity)

            async def requests():
                for _ in range(5):
                    yield b"y" * 100

            answer = await send_upload(put(), requests())
        await server.stop(None)
        return answer

    assert asyncio.run(run()) == b"500"
