"""A shared/exclusive gate on one event loop: many shared holders at once, or one
exclusive holder alone, admitted in arrival order.

The vLLM engine holds it shared for each generation and exclusively for each
prompt-logprobs request, which vLLM 0.32 with LoRA cannot run next to any other request
(see `vllm_engine`). Arrival order means a stream of generations cannot starve scoring:
once an exclusive request waits, later generations queue behind it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class ExclusiveGate:
    """Shared holders run together; an exclusive holder runs alone; first come, first served."""

    def __init__(self) -> None:
        self._holders = 0  # shared holders inside, or -1 while an exclusive holder is
        self._queue: collections.deque[tuple[bool, asyncio.Future[None]]] = collections.deque()

    @property
    def holders(self) -> int:
        """Shared holders inside, -1 while held exclusively, 0 when free."""
        return self._holders

    @property
    def waiting(self) -> int:
        return sum(not waiter.done() for _, waiter in self._queue)

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool) -> AsyncIterator[None]:
        await self._acquire(exclusive)
        try:
            yield
        finally:
            self._release(exclusive)

    async def _acquire(self, exclusive: bool) -> None:
        if not self._queue and self._fits(exclusive):
            self._enter(exclusive)
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (exclusive, waiter)
        self._queue.append(entry)
        try:
            await waiter  # `_wake` enters for us before it resolves the waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(exclusive)  # admitted, then cancelled before resuming
            else:
                if entry in self._queue:
                    self._queue.remove(entry)
                self._wake()  # the head may have been what blocked the others
            raise

    def _release(self, exclusive: bool) -> None:
        self._holders = 0 if exclusive else self._holders - 1
        self._wake()

    def _wake(self) -> None:
        while self._queue:
            exclusive, waiter = self._queue[0]
            if waiter.done():  # cancelled while queued
                self._queue.popleft()
                continue
            if not self._fits(exclusive):
                return
            self._queue.popleft()
            self._enter(exclusive)
            waiter.set_result(None)

    def _fits(self, exclusive: bool) -> bool:
        return self._holders == 0 if exclusive else self._holders >= 0

    def _enter(self, exclusive: bool) -> None:
        self._holders = -1 if exclusive else self._holders + 1
