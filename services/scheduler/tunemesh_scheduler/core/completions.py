"""The per-tenant completion log behind WatchOperations: cursors over finished operations.

Each tenant's completions are numbered 1, 2, 3, ... (the cursor) in the order they
finish, within one epoch: the identity of this scheduler incarnation (a restarted
scheduler or a new leader starts a new epoch, and its cursors start over). The log keeps
the last `capacity` completions of each tenant; a watcher that reconnects with a cursor
still covered gets every completion after it, and one whose cursor cannot be served
(another epoch, or trimmed) is told so and asks for its operations once instead.

`CompletionLog` decides (pure, no clock); `CompletionFeed` adds the asyncio wake-ups.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_CAPACITY = 10_000
"""Completions kept per tenant: a watcher that falls further behind re-asks once."""


@dataclasses.dataclass(frozen=True)
class Replay(Generic[T]):
    """What a watcher at a cursor is owed: the completions after it, up to `cursor`."""

    epoch: str
    cursor: int  # the position after these completions (the tenant's current cursor)
    items: list[T]
    cursor_lost: bool  # completions between the asked cursor and `cursor` are not in `items`


class CompletionLog(Generic[T]):
    """Completions per tenant, numbered by an increasing cursor, the last `capacity` kept."""

    def __init__(self, epoch: str, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.epoch, self._capacity = epoch, capacity
        self._heads: dict[str, int] = {}
        self._logs: dict[str, collections.deque[tuple[int, T]]] = {}

    def append(self, tenant: str, item: T) -> int:
        """Record one completion of `tenant`; returns its cursor."""
        cursor = self._heads.get(tenant, 0) + 1
        self._heads[tenant] = cursor
        log = self._logs.get(tenant)
        if log is None:
            log = self._logs[tenant] = collections.deque(maxlen=self._capacity)
        log.append((cursor, item))
        return cursor

    def head(self, tenant: str) -> int:
        """The cursor of the tenant's latest completion (0 before the first)."""
        return self._heads.get(tenant, 0)

    def replay(self, tenant: str, epoch: str, cursor: int) -> Replay[T]:
        """The completions after `cursor` of `epoch`. A new watch (`epoch` "") starts at
        the head with nothing owed; a cursor of another epoch, past the head or older than
        the oldest kept completion is lost: the replay starts at the head."""
        head = self.head(tenant)
        if not epoch:
            return Replay(self.epoch, head, [], cursor_lost=False)
        log = self._logs.get(tenant, ())
        oldest = log[0][0] if log else head + 1
        if epoch != self.epoch or cursor > head or cursor < oldest - 1:
            return Replay(self.epoch, head, [], cursor_lost=True)
        skip = cursor - oldest + 1  # entries at or before `cursor`
        items = [item for _, item in list(log)[skip:]]
        return Replay(self.epoch, head, items, cursor_lost=False)


@dataclasses.dataclass(frozen=True)
class WatchBatch(Generic[T]):
    """One message of a watch: done operations (none: a heartbeat) and the cursor after them."""

    epoch: str
    cursor: int
    items: list[T]
    cursor_lost: bool = False
    missing: list[str] = dataclasses.field(default_factory=list)


class CompletionFeed(Generic[T]):
    """A CompletionLog that wakes the watchers of a tenant when it grows."""

    def __init__(self, log: CompletionLog[T]) -> None:
        self.log = log
        self._events: dict[str, asyncio.Event] = {}

    def record(self, tenant: str, item: T) -> None:
        self.log.append(tenant, item)
        event = self._events.pop(tenant, None)
        if event is not None:
            event.set()

    async def wait_past(self, tenant: str, cursor: int, timeout_s: float) -> None:
        """Return once the tenant's head is past `cursor`, or after `timeout_s`."""
        if self.log.head(tenant) > cursor:
            return
        event = self._events.get(tenant)
        if event is None:
            event = self._events[tenant] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            pass
