"""OperationWatcher: one WatchOperations stream resolves every operation a client awaits.

All of it runs on the client's event loop. The scheduler numbers its tenant's
completions with a cursor within an epoch (its incarnation) and streams those after the
client's cursor, with a heartbeat carrying the current cursor every few seconds. The
watcher keeps (epoch, cursor), so a stream that drops, or says nothing (heartbeats
included) for `progress_timeout_s`, is reopened where it stopped and misses nothing.

Why no completion is missed: an operation submitted after the watcher holds a position
finishes after that position, so the stream delivers it as long as the position carries
on (same epoch, cursor still in the log). Every other awaited operation is settled once
the stream has a fresh position: named in the (re)open request (the first response
carries those already done, and `missing` those the scheduler does not hold), or asked
for once with GetOperation right after the first response. That also covers a
`cursor_lost` answer (a restarted scheduler, a new leader, a trimmed log). A completion
streamed before its submit's answer is read is kept while submits are in flight.

A server without WatchOperations (UNIMPLEMENTED), or a caller-supplied synchronous
channel, gets one WaitOperation long-poll coroutine per operation instead: still no
thread per operation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any

import grpc
from google.protobuf import duration_pb2

from tunemesh.errors import ClientClosedError, NotFoundError, TunemeshError, error_from_rpc
from tunemesh.transport import Transport
from tunemesh.v1 import operations_pb2

logger = logging.getLogger(__name__)

WAIT_TIMEOUT_S = 30.0
"""How long one WaitOperation long-poll is held (the fallback without a stream)."""
_WAIT_MARGIN_S = 15.0
PROGRESS_TIMEOUT_S = 15.0
"""A watch stream silent this long (no completion, no heartbeat) is reopened."""
UNCLAIMED_LIMIT = 10_000
"""Completions kept for submits in flight (the stream may outrun their answers)."""
FATAL_WATCH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                               grpc.StatusCode.INVALID_ARGUMENT})

Operation = operations_pb2.Operation


class OperationWatcher:
    """Futures of done operations, by name; loop-only (no method is thread-safe)."""

    def __init__(self, transport: Transport, wait_timeout_s: float = WAIT_TIMEOUT_S,
                 progress_timeout_s: float = PROGRESS_TIMEOUT_S) -> None:
        self._transport = transport
        self._wait_timeout_s, self._progress_timeout_s = wait_timeout_s, progress_timeout_s
        self._streaming = transport.is_aio
        self._waiters: dict[str, list[asyncio.Future[Operation]]] = {}
        self._covered: set[str] = set()  # awaited names the stream's position covers
        self._unclaimed: collections.OrderedDict[str, Operation] = collections.OrderedDict()
        self._in_flight = 0
        self._epoch, self._cursor = "", 0
        self._generation = 0  # bumped whenever the position stops covering what it covered
        self._stream: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def expect(self) -> int | None:
        """A submit is about to go out: keep completions no waiter claims until `settle`.
        Returns the token to pass to `wait` for its operation."""
        self._in_flight += 1
        return self._generation if self._epoch else None

    def settle(self) -> None:
        """The submit of an `expect` has its answer (and its `wait` is registered)."""
        self._in_flight -= 1
        if not self._in_flight:
            self._unclaimed.clear()

    def wait(self, name: str, token: int | None = None) -> asyncio.Future[Operation]:
        """A future of operation `name` once done; fails with the error that ends the wait
        (NOT_FOUND [OPERATION_NOT_FOUND] when the service lost it, ClientClosedError).
        `token` is `expect()`'s for the submit that returned `name`."""
        future: asyncio.Future[Operation] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(ClientClosedError(message="the client was closed"))
            return future
        if (operation := self._unclaimed.pop(name, None)) is not None:
            future.set_result(operation)
            return future
        first = name not in self._waiters
        self._waiters.setdefault(name, []).append(future)
        if not first:
            return future
        if not self._streaming:
            self._spawn(self._poll(name))
            return future
        if self._epoch:  # the stream holds a position: covered, or settled by one Get now
            if token is None or token != self._generation:
                self._spawn(self._get_once(name))
            self._covered.add(name)
        if self._stream is None or self._stream.done():
            self._stream = asyncio.get_running_loop().create_task(self._watch(), name="tunemesh-watch")
        return future

    def close(self) -> None:
        """Stop streaming and polling; fail every waiter with ClientClosedError."""
        self._closed = True
        for task in [self._stream, *self._tasks]:
            if task is not None:
                task.cancel()
        for name in list(self._waiters):
            self._fail(name, ClientClosedError(message="the client was closed"))

    # The stream.

    async def _watch(self) -> None:
        retries, failing_since = 0, None
        while not self._closed and (self._waiters or self._in_flight):
            named = [name for name in self._waiters if name not in self._covered]
            request = operations_pb2.WatchOperationsRequest(epoch=self._epoch, cursor=self._cursor, names=named)
            request.heartbeat_interval.FromNanoseconds(int(self._progress_timeout_s / 3 * 1e9))
            call = self._transport.operations.WatchOperations(request, metadata=self._transport.metadata)
            try:
                first = True
                while True:
                    async with asyncio.timeout(self._progress_timeout_s):
                        response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    self._accept(response, set(named) if first else None)
                    first, retries, failing_since = False, 0, None
                    if not (self._waiters or self._in_flight):
                        return
            except TimeoutError:
                logger.info("WatchOperations said nothing for %.1fs; reopening it", self._progress_timeout_s)
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                if error.code is grpc.StatusCode.UNIMPLEMENTED:
                    logger.info("the service has no WatchOperations; waiting with WaitOperation")
                    self._poll_instead()
                    return
                failing_since = failing_since or time.monotonic()
                if (error.code in FATAL_WATCH_CODES
                        or time.monotonic() - failing_since > self._transport.policy.total_timeout_s):
                    for name in list(self._waiters):
                        self._fail(name, error)
                    return
                logger.info("WatchOperations failed (%s); reopening it", error)
            finally:
                call.cancel()
            await asyncio.sleep(self._transport.policy.backoff(retries))
            retries += 1

    def _accept(self, response: operations_pb2.WatchOperationsResponse, named: set[str] | None) -> None:
        """Take one stream message; `named` are the request's names (first message only)."""
        self._resolve_all(response.operations)
        for name in response.missing:
            self._fail(name, NotFoundError("OPERATION_NOT_FOUND", f"operation {name!r} not found"))
        if response.cursor_lost:
            logger.info("the watch cursor (%s, %d) is gone; asking for each awaited operation once",
                        self._epoch or "-", self._cursor)
            self._generation += 1
        if named is not None or response.cursor_lost:
            for name in list(self._waiters):
                if name not in (named or ()) and (response.cursor_lost or name not in self._covered):
                    self._spawn(self._get_once(name))
                self._covered.add(name)
        self._epoch, self._cursor = response.epoch, response.cursor

    async def _get_once(self, name: str) -> None:
        request = operations_pb2.GetOperationRequest(name=name)
        try:
            response = await self._transport.call_async(self._transport.operations.GetOperation, request,
                                                        what=f"GetOperation({name})")
        except TunemeshError as err:
            self._fail(name, err)
            return
        if response.operation.done:
            self._resolve_all([response.operation])

    # Without a stream: one long-poll coroutine per operation.

    def _poll_instead(self) -> None:
        self._streaming = False
        for name in self._waiters:
            self._spawn(self._poll(name))

    async def _poll(self, name: str) -> None:
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(self._wait_timeout_s * 1e9))
        request = operations_pb2.WaitOperationRequest(name=name, timeout=timeout)
        while name in self._waiters:
            try:
                response = await self._transport.call_async(
                    self._transport.operations.WaitOperation, request, what=f"WaitOperation({name})",
                    attempt_timeout_s=self._wait_timeout_s + _WAIT_MARGIN_S)
            except TunemeshError as err:
                self._fail(name, err)
                return
            if response.operation.done:
                self._resolve_all([response.operation])

    # Resolution.

    def _resolve_all(self, operations: Iterable[Operation]) -> None:
        for operation in operations:
            waiters = self._waiters.pop(operation.name, None)
            self._covered.discard(operation.name)
            if waiters is None:
                if self._in_flight:  # maybe a submit's whose answer is still on its way
                    self._unclaimed[operation.name] = operation
                    while len(self._unclaimed) > UNCLAIMED_LIMIT:
                        self._unclaimed.popitem(last=False)
                continue
            for future in waiters:
                if not future.done():
                    future.set_result(operation)

    def _fail(self, name: str, error: BaseException) -> None:
        self._covered.discard(name)
        for future in self._waiters.pop(name, ()):
            if not future.done():
                future.set_exception(error)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
