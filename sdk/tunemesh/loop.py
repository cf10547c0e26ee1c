"""LoopThread: the one asyncio event loop of a ServiceClient, run on one daemon thread.

Everything the SDK does in the background runs on it as a task: submit queues, the
operation watcher, heartbeats, sampling calls. Sync callers hand it coroutines and block
on a concurrent.futures.Future (`run`, `submit`); async callers await an APIFuture from
their own loop, bridged with asyncio.wrap_future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 5.0


class LoopThread:
    """An event loop running forever on a daemon thread until `close()`."""

    def __init__(self, name: str = "tunemesh-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def in_loop(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule `coro` on the loop; its concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and block until it returns (or raises).

        Raises RuntimeError on the loop's own thread (e.g. from a done callback), where
        blocking would deadlock: await the call's future there instead.
        """
        if self.in_loop():
            coro.close()
            raise RuntimeError("a blocking tunemesh call on the SDK's own event loop thread "
                               "(e.g. in a done callback) would deadlock; use the future instead")
        return self.submit(coro).result(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon (FIFO across threads)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        """Cancel the loop's tasks, stop it and join its thread. Idempotent."""
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        if self.in_loop():  # cannot join ourselves: stop after this callback
            self.loop.call_soon(self.loop.stop)
            return
        try:
            self.submit(_cancel_tasks()).result(_CLOSE_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_CLOSE_TIMEOUT_S)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


async def _cancel_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
