"""A fake grpc.Channel that dispatches the generated stubs' calls to Python handlers
(called directly, or through `.future()` as the SDK does on a synchronous channel)."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import grpc

from tunemesh.errors import error_for, to_status


class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a failed unary call raises: code, details and trailing metadata (the rich
    status a tunemesh server sends, when there is a `reason`)."""

    def __init__(self, code: grpc.StatusCode, details: str = "", reason: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details
        self._trailers = to_status(error_for(code, reason, details)).trailing_metadata if reason else ()

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


Handler = Callable[[Any, dict[str, str]], Any]


class FakeChannel:
    """Routes `/pkg.Service/Method` to `handlers["Method"](request, metadata)`.

    Requests pass through the real serializers, so what a handler sees is what the wire
    would carry. Every call is recorded as (method, request, metadata, timeout).
    """

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.calls: list[tuple[str, Any, dict[str, str], float | None]] = []
        self.lock = threading.Lock()
        self.closed = False

    def unary_unary(self, path, request_serializer=None, response_deserializer=None, **_):
        method = path.rsplit("/", 1)[-1]

        def invoke(request, timeout=None, metadata=None, **__):
            decoded = type(request).FromString(request_serializer(request))
            meta = dict(metadata or ())
            with self.lock:
                self.calls.append((method, decoded, meta, timeout))
            handler = self.handlers.get(method)
            if handler is None:
                raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, method)
            response = handler(decoded, meta)
            return response_deserializer(response.SerializeToString())

        def future(request, timeout=None, metadata=None, **__):
            """Like grpc's: a future of the call (run at once, here)."""
            done: concurrent.futures.Future = concurrent.futures.Future()
            try:
                done.set_result(invoke(request, timeout=timeout, metadata=metadata))
            except grpc.RpcError as err:
                done.set_exception(err)
            return done

        invoke.future = future
        return invoke

    def unary_stream(self, path, *_, **__):
        return self._unimplemented(path)

    def stream_unary(self, path, *_, **__):
        return self._unimplemented(path)

    @staticmethod
    def _unimplemented(path):
        def invoke(*_, **__):
            raise FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, path.rsplit("/", 1)[-1])

        return invoke

    def close(self) -> None:
        self.closed = True

    def requests(self, method: str) -> list[Any]:
        with self.lock:
            return [req for name, req, _, _ in self.calls if name == method]
