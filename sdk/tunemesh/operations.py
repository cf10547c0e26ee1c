"""Background submission and long-poll waiting that resolve APIFutures.

A `SubmitLane` sends one client's ordered calls one at a time, in seq_id order, on a
daemon thread, so a call returns at once and the wire order matches the seq_id order.
Once the service answers with an Operation, a daemon thread long-polls `WaitOperation`
until it is done and resolves the future. Daemon threads never block interpreter exit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import duration_pb2

from tunemesh import _wire
from tunemesh.errors import ClientClosedError
from tunemesh.futures import APIFuture
from tunemesh.transport import Transport
from tunemesh.v1 import operations_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")
Submit = Callable[[], operations_pb2.Operation]
Convert = Callable[[operations_pb2.Operation], Any]

WAIT_TIMEOUT_S = 30.0
_WAIT_MARGIN_S = 15.0


class SubmitLane:
    """A queue drained by one daemon thread: tasks run one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], None]) -> None:
        self._queue.put(task)

    def close(self) -> None:
        self._queue.put(None)

    def _drain(self) -> None:
        while (task := self._queue.get()) is not None:
            task()


class OperationTracker:
    """Submits operations, waits for them and resolves their futures."""

    def __init__(self, transport: Transport, wait_timeout_s: float = WAIT_TIMEOUT_S) -> None:
        self._transport = transport
        self._wait_timeout_s = wait_timeout_s
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pending: set[APIFuture[Any]] = set()

    def start(self, lane: SubmitLane, submit: Submit, convert: Convert) -> APIFuture[Any]:
        """Queue `submit` on `lane`; the future resolves to `convert(done_operation)`."""
        future: APIFuture[Any] = APIFuture()
        if self._closed.is_set():
            future._set_exception(ClientClosedError(message="the client is closed"))
            return future
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        lane.put(lambda: self._submit(future, submit, convert))
        return future

    def close(self) -> None:
        """Stop waiting; fail every pending future with ClientClosedError."""
        self._closed.set()
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future._set_exception(ClientClosedError(message="the client was closed"))

    def _forget(self, future: APIFuture[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _submit(self, future: APIFuture[Any], submit: Submit, convert: Convert) -> None:
        if future.done():
            return
        try:
            operation = submit()
        except Exception as err:  # noqa: BLE001 - every failure belongs to this future only
            future._set_exception(err)
            return
        if operation.done:
            self._resolve(future, operation, convert)
            return
        waiter = threading.Thread(
            target=self._wait,
            args=(future, operation.name, convert),
            name=f"tunemesh-wait-{operation.name}",
            daemon=True,
        )
        waiter.start()

    def _wait(self, future: APIFuture[Any], name: str, convert: Convert) -> None:
        try:
            operation = self.wait(name, until=future.done)
        except Exception as err:  # noqa: BLE001
            future._set_exception(err)
            return
        if operation is not None:
            self._resolve(future, operation, convert)

    def wait(self, name: str, until: Callable[[], bool] = lambda: False) -> operations_pb2.Operation | None:
        """Long-poll operation `name` until it is done (None if `until()` turns true first)."""
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(self._wait_timeout_s * 1e9))
        request = operations_pb2.WaitOperationRequest(name=name, timeout=timeout)
        while not until():
            if self._closed.is_set():
                raise ClientClosedError(message="the client was closed")
            response = self._transport.call(
                self._transport.operations.WaitOperation,
                request,
                what=f"WaitOperation({name})",
                attempt_timeout_s=self._wait_timeout_s + _WAIT_MARGIN_S,
            )
            if response.operation.done:
                return response.operation
        return None

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
