"""Client-streamed uploads between mesh services, refused without a race.

grpc.aio has a race on a client stream the server ends early: if a write is in flight
when the server's status arrives, the client's call can end INTERNAL "Internal error
from Core" instead of the server's status (the failed write overwrites it), so a typed
refusal (BAD_UPLOAD, STORAGE_QUOTA, DISK_FULL...) reaches the caller as INTERNAL about
one time in five. The two ends agree on a handshake that keeps every write before the
status:

- the server, refusing (`refusals_after_drain`), first sends initial metadata marked
  `REFUSED_KEY`, then reads and drops what is still in flight until the client
  half-closes, and only then ends the call with its error;
- the client (`send_upload`) stops feeding as soon as it sees the mark, half-closes and
  awaits the call, whose status is then the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from tunemesh.errors import TunemeshError

REFUSED_KEY = "tunemesh-upload-refused"
_WRITE_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


@contextlib.asynccontextmanager
async def refusals_after_drain(context: grpc.aio.ServicerContext, requests: AsyncIterable) -> AsyncIterator[None]:
    """Server side: a TunemeshError raised inside marks the upload refused, drains
    `requests` (the handler's request iterator; nothing is kept) and is then raised."""
    try:
        yield
    except TunemeshError:
        await context.send_initial_metadata(((REFUSED_KEY, "1"),))
        async for _ in requests:
            pass
        raise


async def send_upload(call: grpc.aio.StreamUnaryCall, requests: AsyncIterable):
    """Client side: feed `requests` to `call` (a stream-unary call made without a request
    iterator), one message in flight at a time, and return its response; raises
    grpc.aio.AioRpcError with the server's status. An error of `requests` cancels the
    call and is raised."""
    refusal = asyncio.ensure_future(_refused(call))
    try:
        requests = aiter(requests)
        while (request := await _next_unless_refused(requests, refusal)) is not None:
            try:
                await call.write(request)
            except _WRITE_ENDED:
                break  # the call ended without the handshake (deadline, crash): its status says why
        with contextlib.suppress(*_WRITE_ENDED):
            await call.done_writing()
        return await call
    finally:
        refusal.cancel()
        if not call.done():
            call.cancel()


async def _refused(call: grpc.aio.StreamUnaryCall) -> bool:
    return any(key == REFUSED_KEY for key, _ in await call.initial_metadata() or ())


async def _next_unless_refused(requests: AsyncIterator, refusal: asyncio.Future):
    """The next request, or None at the end of `requests` or once the server refused."""
    if refusal.done():
        return None if refusal.result() else await anext(requests, None)
    following = asyncio.ensure_future(anext(requests, None))
    await asyncio.wait({following, refusal}, return_when=asyncio.FIRST_COMPLETED)
    if refusal.done() and refusal.result():
        if not following.done():
            following.cancel()
            await asyncio.wait({following})
        return None
    return await following
