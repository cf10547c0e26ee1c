"""The scheduler's write path to its `RunStore`: ordered, grouped, retried.

Core methods note each change with `note()` (synchronously, in the order they happen) and
get a ticket; `synced(ticket)` waits until that change and every earlier one is in the
store. One flusher task writes whatever is pending as one `apply` (group commit), so a
burst of submits costs one round trip. Woken by a change, the flusher first lingers
`linger_s` (2 ms): the changes of one scheduler turn (a batch's outcomes, the submits
that follow them) share a transaction, and the next batch goes out to its trainer before
the journal's encoding and etcd call take the event loop, so the write overlaps the
trainer's compute instead of delaying it. When the store is unreachable the flusher retries
with backoff and keeps every change, in order, until it comes back.

Without a store (`Journal(None)`) nothing is kept and nothing waits: a scheduler whose
state lives and dies with its process.

Callers choose how long to wait: creating a session or a run waits for the store and
answers UNAVAILABLE when it is down (nothing was promised); a training submit waits only
briefly, so runs keep training through a store outage (its op log catches up later).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tunemesh.errors import TunemeshError, UnavailableError
from tunemesh_scheduler.core.ports import RunStore, StoreWrite

log = logging.getLogger(__name__)

MAX_GROUP = 64  # changes per apply (etcd allows 128 operations per transaction)


class Journal:
    """Pending changes and the flusher that writes them."""

    def __init__(self, store: RunStore | None, retry_s: Callable[[int], float] = lambda n: min(2.0, 0.1 * 2**n),
                 linger_s: float = 0.002) -> None:
        self._store = store
        self._linger_s = linger_s
        self._retry_s = retry_s
        self._pending: list[StoreWrite] = []
        self._noted = 0  # tickets handed out
        self._synced = 0  # every ticket <= this is in the store
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.store_up = True  # the last apply succeeded
        self.on_synced: list[Callable[[int], None]] = []  # called with `synced_ticket` as it grows

    @property
    def latest(self) -> int:
        """The ticket of the last change noted."""
        return self._noted

    @property
    def synced_ticket(self) -> int:
        """Every change with a ticket up to this one is in the store."""
        return self._synced

    @property
    def backlog(self) -> int:
        return self._noted - self._synced

    def note(self, write: StoreWrite) -> int:
        """Queue one change; returns its ticket."""
        if self._store is None:
            return 0
        self._pending.append(write)
        self._noted += 1
        self._wake.set()
        return self._noted

    def start(self) -> None:
        if self._store is None:
            return
        self._task = asyncio.get_running_loop().create_task(self._flush_forever(), name="journal")

    async def stop(self, drain_s: float = 2.0) -> None:
        """Try to write what is pending (bounded), then stop."""
        if self._task is None:
            return
        try:
            await self.synced(self._noted, drain_s)
        except UnavailableError:
            log.warning("stopping with %d changes not yet stored", self.backlog)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def synced(self, ticket: int, timeout_s: float) -> bool:
        """Wait until `ticket` is stored. Raises UnavailableError(STORE_UNAVAILABLE) after
        `timeout_s` (the change stays queued and is written once the store is back)."""
        if ticket <= self._synced:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: ticket <= self._synced)
        except TimeoutError:
            raise UnavailableError(
                "STORE_UNAVAILABLE", f"the scheduler's state store (etcd) did not confirm within {timeout_s:g}s"
            ) from None
        return True

    async def _flush_forever(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                await asyncio.sleep(self._linger_s)
            group = self._pending[:MAX_GROUP]
            try:
                await self._store.apply(group)
            except (TunemeshError, OSError) as exc:
                self.store_up = False
                delay = self._retry_s(failures)
                failures += 1
                log.warning("state store write failed (%r); %d changes pending, retry in %.1fs",
                            exc, len(self._pending), delay)
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("state store reachable again; writing %d pending changes", len(self._pending))
            failures = 0
            self.store_up = True
            del self._pending[: len(group)]
            self._synced += len(group)
            for callback in self.on_synced:
                callback(self._synced)
            async with self._changed:
                self._changed.notify_all()
