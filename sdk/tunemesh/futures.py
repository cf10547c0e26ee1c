"""APIFuture: one future type for sync (`.result()`) and async (`await`) use."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The pending result of a call; resolves in the background.

    `fut.result(timeout)` blocks; `await fut` works from any running asyncio loop.
    A failed call raises a `tunemesh.TunemeshError` subclass from either.
    """

    def __init__(self, inner: concurrent.futures.Future | None = None) -> None:
        self._inner: concurrent.futures.Future = inner or concurrent.futures.Future()

    def result(self, timeout: float | None = None) -> T:
        """Block until done; raises TimeoutError if `timeout` seconds pass first."""
        return self._inner.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._inner.exception(timeout)

    def done(self) -> bool:
        return self._inner.done()

    def add_done_callback(self, fn: Callable[[APIFuture[T]], Any]) -> None:
        self._inner.add_done_callback(lambda _: fn(self))

    def future(self) -> concurrent.futures.Future:
        """The underlying concurrent.futures.Future."""
        return self._inner

    async def result_async(self, timeout: float | None = None) -> T:
        """Await the result; raises TimeoutError if `timeout` seconds pass first. Like
        `result(timeout)`, a timeout leaves the call running: await it again later."""
        if timeout is None:
            return await asyncio.wrap_future(self._inner)
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._inner)), timeout)

    async def coroutine(self) -> T:
        """Await the result (for APIs that want a coroutine object)."""
        return await asyncio.wrap_future(self._inner)

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self._inner).__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<APIFuture {state}>"

    # Resolution, used by the SDK's background workers.

    def _set_result(self, value: T) -> None:
        try:
            self._inner.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # already resolved (e.g. failed by close())

    def _set_exception(self, error: BaseException) -> None:
        try:
            self._inner.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass
