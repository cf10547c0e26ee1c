"""Background submission and long-poll waiting that resolve APIFutures.

A `SubmitLane` sends one client's ordered calls one at a time, in seq_id order, on a
daemon thread, so a call returns at once and the wire order matches the seq_id order.
Once the service answers with an Operation, a daemon thread long-polls `WaitOperation`
until it is done and resolves the future. Daemon threads never block interpreter exit.

A scheduler that restarts may lose operations it had queued; waiting on one then answers
NOT_FOUND [OPERATION_NOT_FOUND]. A future given a `resend` re-sends its submit (same
request_id and seq_id) and waits on the operation the service returns, at most
MAX_RESENDS times.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from tunemesh import _wire
from tunemesh.errors import ClientClosedError, TunemeshError
from tunemesh.futures import APIFuture
from tunemesh.transport import Transport
from tunemesh.v1 import operations_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")
Submit = Callable[[], operations_pb2.Operation]
Convert = Callable[[operations_pb2.Operation], Any]

WAIT_TIMEOUT_S = 30.0
_WAIT_MARGIN_S = 15.0
MAX_RESENDS = 3
"""Re-sends per wait when the service has lost the operation (OPERATION_NOT_FOUND)."""


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

    def start(
        self, lane: SubmitLane, submit: Submit, convert: Convert, resend: Submit | None = None
    ) -> APIFuture[Any]:
        """Queue `submit` on `lane`; the future resolves to `convert(done_operation)`.

        `resend` sends the submitted request again unchanged; see `wait`.
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

    def _submit(
        self, future: APIFuture[Any], submit: Submit, convert: Convert, resend: Submit | None
    ) -> None:
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
            args=(future, operation.name, convert, resend),
            name=f"tunemesh-wait-{operation.name}",
            daemon=True,
        )
        waiter.start()

    def _wait(
        self, future: APIFuture[Any], name: str, convert: Convert, resend: Submit | None
    ) -> None:
        try:
            operation = self.wait(name, until=future.done, resend=resend)
        except Exception as err:  # noqa: BLE001
            future._set_exception(err)
            return
        if operation is not None:
            self._resolve(future, operation, convert)

    def wait(
        self, name: str, until: Callable[[], bool] = lambda: False, resend: Submit | None = None
    ) -> operations_pb2.Operation | None:
        """Long-poll operation `name` until it is done (None if `until()` turns true first).

        If the service has lost the operation (NOT_FOUND [OPERATION_NOT_FOUND]) and
        `resend` is given, `resend()` submits it again, same request_id and seq_id, up to
        MAX_RESENDS times: the service returns the operation it holds or queues it anew,
        and the wait goes on with that one. An error of the re-send (e.g.
        FAILED_PRECONDITION [SEQ_ID_PASSED]: the run is past that seq_id) is raised.
        """
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(int(self._wait_timeout_s * 1e9))
        resends_left = MAX_RESENDS if resend is not None else 0
        while not until():
            if self._closed.is_set():
                raise ClientClosedError(message="the client was closed")
            try:
                operation = self._transport.call(
                    self._transport.operations.WaitOperation,
                    operations_pb2.WaitOperationRequest(name=name, timeout=timeout),
                    what=f"WaitOperation({name})",
                    attempt_timeout_s=self._wait_timeout_s + _WAIT_MARGIN_S,
                ).operation
            except TunemeshError as err:
                if not (resends_left and _lost(err)):
                    raise
                resends_left -= 1
                logger.warning("the service lost %s (%s); re-sending its submit", name, err)
                operation = resend()
            if operation.done:
                return operation
            name = operation.name
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


def _lost(err: TunemeshError) -> bool:
    """Whether a WaitOperation error says the service no longer holds the operation."""
    return err.code is grpc.StatusCode.NOT_FOUND and err.reason == "OPERATION_NOT_FOUND"
