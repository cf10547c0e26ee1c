"""Ordered submission and waiting that resolve APIFutures, on the client's event loop.

A `SubmitLane` is one client's ordered submit queue: an asyncio queue drained by one task,
so a call returns at once and its submits go on the wire one at a time, in call (seq_id)
order. Once the service answers with an Operation, the `OperationWatcher` (one per
ServiceClient: one WatchOperations stream for all its operations) resolves the future.
No thread is started per call or per operation.

A scheduler that restarts may lose operations it had queued; waiting on one then answers
NOT_FOUND [OPERATION_NOT_FOUND]. A future given a `resend` re-sends its submit (same
request_id and seq_id) and waits on the operation the service returns, at most
MAX_RESENDS times.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tunemesh import _wire
from tunemesh.errors import ClientClosedError, TunemeshError
from tunemesh.futures import APIFuture
from tunemesh.loop import LoopThread
from tunemesh.transport import Transport
from tunemesh.v1 import operations_pb2
from tunemesh.watcher import PROGRESS_TIMEOUT_S, WAIT_TIMEOUT_S, OperationWatcher

logger = logging.getLogger(__name__)

T = TypeVar("T")
Submit = Callable[[], Awaitable[operations_pb2.Operation]]
Convert = Callable[[operations_pb2.Operation], Any]

MAX_RESENDS = 3
"""Re-sends per wait when the service has lost the operation (OPERATION_NOT_FOUND)."""

__all__ = ["MAX_RESENDS", "WAIT_TIMEOUT_S", "OperationTracker", "SubmitLane"]


class SubmitLane:
    """An asyncio queue drained by one task on the loop: tasks run one at a time, in the
    order `put` was called (from any thread)."""

    def __init__(self, loop: LoopThread, name: str) -> None:
        self._loop, self._name = loop, name
        self._queue: asyncio.Queue[Callable[[], Awaitable[None]] | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def put(self, task: Callable[[], Awaitable[None]]) -> None:
        self._loop.call_soon(self._put, task)

    def close(self) -> None:
        try:
            self._loop.call_soon(self._put, None)
        except RuntimeError:
            pass  # the loop is gone, and the drain with it

    def _put(self, task: Callable[[], Awaitable[None]] | None) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = self._loop.loop.create_task(self._drain(), name=self._name)
        self._queue.put_nowait(task)

    async def _drain(self) -> None:
        while (task := await self._queue.get()) is not None:
            await task()


class OperationTracker:
    """Submits operations, waits for them and resolves their futures."""

    def __init__(self, transport: Transport, wait_timeout_s: float = WAIT_TIMEOUT_S,
                 progress_timeout_s: float = PROGRESS_TIMEOUT_S) -> None:
        self._transport = transport
        self._watcher = OperationWatcher(transport, wait_timeout_s, progress_timeout_s)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pending: set[APIFuture[Any]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(
        self, lane: SubmitLane, submit: Submit, convert: Convert, resend: Submit | None = None
    ) -> APIFuture[Any]:
        """Queue `submit` on `lane`; the future resolves to `convert(done_operation)`.

        `resend` sends the submitted request again unchanged; see `_settled`.
        """
        future: APIFuture[Any] = APIFuture()
        if self._closed.is_set():
            future._set_exception(ClientClosedError(message="the client is closed"))
            return future
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        lane.put(lambda: self._submit(future, submit, convert, resend))
        return future

    async def submit_and_wait(self, submit: Submit, resend: Submit | None = None) -> operations_pb2.Operation:
        """On the loop: send `submit` and wait until its operation is done (see `_settled`)."""
        token = self._watcher.expect()
        try:
            operation = await submit()
            if operation.done:
                return operation
            waiting = self._watcher.wait(operation.name, token)
        finally:
            self._watcher.settle()
        return await self._settled(waiting, resend)

    def close(self) -> None:
        """Stop waiting; fail every pending future with ClientClosedError."""
        self._closed.set()
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future._set_exception(ClientClosedError(message="the client was closed"))
        try:
            self._transport.loop.call_soon(self._watcher.close)
        except RuntimeError:
            pass  # the loop is already gone

    def _forget(self, future: APIFuture[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    async def _submit(
        self, future: APIFuture[Any], submit: Submit, convert: Convert, resend: Submit | None
    ) -> None:
        """On the lane: send, then leave the wait to a task so the next submit goes out."""
        if future.done():
            return
        token = self._watcher.expect()
        try:
            operation = await submit()
            if operation.done:
                self._resolve(future, operation, convert)
                return
            waiting = self._watcher.wait(operation.name, token)
        except Exception as err:  # noqa: BLE001 - every failure belongs to this future only
            future._set_exception(err)
            return
        finally:
            self._watcher.settle()
        task = asyncio.get_running_loop().create_task(self._finish(future, waiting, convert, resend))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, future: APIFuture[Any], waiting: asyncio.Future, convert: Convert,
                      resend: Submit | None) -> None:
        try:
            operation = await self._settled(waiting, resend)
        except Exception as err:  # noqa: BLE001
            future._set_exception(err)
            return
        self._resolve(future, operation, convert)

    async def _settled(self, waiting: asyncio.Future, resend: Submit | None) -> operations_pb2.Operation:
        """The done operation `waiting` resolves to.

        If the service has lost the operation (NOT_FOUND [OPERATION_NOT_FOUND]) and
        `resend` is given, `resend()` submits it again, same request_id and seq_id, up to
        MAX_RESENDS times: the service returns the operation it holds or queues it anew,
        and the wait goes on with that one. An error of the re-send (e.g.
        FAILED_PRECONDITION [SEQ_ID_PASSED]: the run is past that seq_id) is raised.
        """
        resends_left = MAX_RESENDS if resend is not None else 0
        while True:
            try:
                return await waiting
            except TunemeshError as err:
                if not (resends_left and _lost(err)):
                    raise
                resends_left -= 1
                logger.warning("the service lost an operation (%s); re-sending its submit", err)
            token = self._watcher.expect()
            try:
                operation = await resend()
                if operation.done:
                    return operation
                waiting = self._watcher.wait(operation.name, token)
            finally:
                self._watcher.settle()

    @staticmethod
    def _resolve(
        future: APIFuture[Any], operation: operations_pb2.Operation, convert: Convert
    ) -> None:
        error = _wire.operation_error(operation)
        if error is not None:
            future._set_exception(error)
            return
        try:
            future._set_result(convert(operation))
        except Exception as err:  # noqa: BLE001 - a malformed result fails this future only
            logger.warning("could not decode the result of %s: %s", operation.name, err)
            future._set_exception(err)


def _lost(err: TunemeshError) -> bool:
    """Whether a wait's error says the service no longer holds the operation."""
    return err.code is grpc.StatusCode.NOT_FOUND and err.reason == "OPERATION_NOT_FOUND"
