"""The scheduler's write path to its `RunStore`: ordered, grouped, retried.

Core methods note each change with `note()` (synchronously, in the order they happen) and
get a ticket; `synced(ticket)` waits until that change and every earlier one is in the
store. One flusher task writes whatever is pending as one `apply` (group commit).

How long a change waits depends on who waits for it. Each store transaction costs etcd and
the scheduler about the same CPU whatever it holds, so the flusher gathers:

- **urgent**: someone waits, or is about to wait, on the change (`synced()`: a create, a
  submit whose client asked for a stored acknowledgement; `urge()`: an operation being
  sent to its trainer, whose result will be held until its submission is stored; a run's
  fifth deferred finish). The flusher writes at once, with whatever else is pending.
- **lazy** (the default): nobody waits yet. The flusher lingers up to `linger_s` (20 ms)
  for more changes, or until something becomes urgent. A training submit acknowledged at
  once (the SDK's way: it keeps the call and re-sends it if the operation is ever lost)
  is lazy while it waits in its run's queue: the submits of clients that keep steps in
  flight share transactions, and are stored by the time their trainer round comes; a
  client that waits on each step has its submit written while the trainer computes.
- **deferrable** (`StoreWrite.deferrable`: an operation's finish, an eviction, a run's
  floor) wakes nobody: it waits, in its place in the order, for the next other change,
  for `defer_s` (50 ms) or for a run's MAX_DEFERRED_PER_RUN-th deferred change, whichever
  comes first, and is written with it. The finishes of one trainer round would otherwise
  take a transaction of their own before the submits they unblock.

Nothing waits on a finish being stored (a client sees a result once the operation's
submission is stored: core/release.py), and a scheduler that dies first leaves the
operation queued in the store, so the next leader sends it again and the trainer, which
applies a seq_id once, answers with the recorded outcome (it keeps a run's last 16:
tunemesh_trainer/ledger.py; a run never has more than MAX_DEFERRED_PER_RUN finishes
waiting here, plus the few it has out). When the store is unreachable the flusher retries
with backoff and keeps every change, in order, until it comes back.

Without a store (`Journal(None)`) nothing is kept and nothing waits: a scheduler whose
state lives and dies with its process.

Callers choose how long to wait: creating a session or a run waits for the store and
answers UNAVAILABLE when it is down (nothing was promised); a training submit that asks
for a stored acknowledgement waits only briefly, so runs keep training through a store
outage (its op log catches up later).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from tunemesh.errors import TunemeshError, UnavailableError
from tunemesh_scheduler.core.ports import RunStore, StoreWrite

log = logging.getLogger(__name__)

MAX_GROUP = 64  # changes per apply (etcd allows 128 operations per transaction)
MAX_DEFERRED_PER_RUN = 4  # a run's deferrable changes waiting at once


class Journal:
    """Pending changes and the flusher that writes them."""

    def __init__(self, store: RunStore | None, retry_s: Callable[[int], float] = lambda n: min(2.0, 0.1 * 2**n),
                 linger_s: float = 0.02, defer_s: float = 0.05) -> None:
        self._store = store
        self._linger_s = linger_s
        self._defer_s = defer_s
        self._retry_s = retry_s
        self._pending: list[StoreWrite] = []
        self._noted = 0  # tickets handed out
        self._synced = 0  # every ticket <= this is in the store
        self._due = 0  # every ticket <= this is to be written now; later deferrable ones may wait
        self._urgent = 0  # someone waits on every ticket <= this: no lingering
        self._hurry = asyncio.Event()  # set when `_urgent` grows: cuts a linger short
        self._deferred: asyncio.TimerHandle | None = None  # makes waiting deferrable changes due
        self._waiting: collections.Counter[str] = collections.Counter()  # deferrable changes not yet due, by run
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
        """Queue one change; returns its ticket. A deferrable one is written with the
        next other change or after `defer_s`."""
        if self._store is None:
            return 0
        self._pending.append(write)
        self._noted += 1
        run = getattr(write.record, "run", "")
        if not write.deferrable or self._defer_s <= 0:
            self._make_due(self._noted)
            return self._noted
        if self._waiting[run] >= MAX_DEFERRED_PER_RUN:  # the trainer keeps only a run's last outcomes
            self.urge(self._noted)
            return self._noted
        self._waiting[run] += 1
        if self._deferred is None:
            self._deferred = asyncio.get_running_loop().call_later(self._defer_s, self._deferred_due)
        return self._noted

    def _make_due(self, ticket: int) -> None:
        if ticket > self._due:
            self._due = ticket
            self._wake.set()
        if ticket >= self._noted:
            self._waiting.clear()

    def _deferred_due(self) -> None:
        self._deferred = None
        self._make_due(self._noted)

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
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    def urge(self, ticket: int) -> None:
        """Someone waits on `ticket`: write it, and everything before it, now."""
        if ticket <= self._synced or ticket <= self._urgent:
            return
        self._urgent = ticket
        self._make_due(ticket)
        self._hurry.set()

    async def synced(self, ticket: int, timeout_s: float) -> bool:
        """Wait until `ticket` is stored (written now: it is urgent). Raises
        UnavailableError(STORE_UNAVAILABLE) after `timeout_s` (the change stays queued and
        is written once the store is back)."""
        if ticket <= self._synced:
            return True
        self.urge(ticket)
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
            if self._synced >= self._due:  # nothing, or only deferrable changes, pending
                self._wake.clear()
                await self._wake.wait()
            await self._linger()
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

    async def _linger(self) -> None:
        """Gather more changes for up to `linger_s`, unless someone waits on one pending
        (or a full group is pending already)."""
        self._hurry.clear()
        if self._urgent > self._synced or len(self._pending) >= MAX_GROUP or self._linger_s <= 0:
            return
        try:
            async with asyncio.timeout(self._linger_s):
                await self._hurry.wait()
        except TimeoutError:
            pass
