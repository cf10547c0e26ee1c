"""Which adapters the engine holds. Adapters are keyed by immutable checkpoint (tenant +
path), so a key always means the same weights and stale weights cannot be served. More
adapters than slots work: the least recently used idle adapter is evicted and reloaded
on its next use; an adapter in use (reference count > 0) is never unloaded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from tunemesh_common.checkpoints.paths import adapter_key

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """A tenant's checkpoint."""

    tenant: str
    path: str

    @property
    def key(self) -> str:
        """The engine's name for these weights (no tenant or path leaks into it)."""
        return adapter_key(self.tenant, self.path)


@dataclasses.dataclass
class _Entry:
    loaded: asyncio.Future
    refs: int = 0
    last_used: float = 0.0


Load = Callable[[AdapterRef], Awaitable[None]]  # fetch + engine.load_adapter(ref.key, ...)
Unload = Callable[[str], Awaitable[None]]


class AdapterCache:
    """Loads on first use (one load per key even under concurrent requests), counts
    references, evicts the least recently used idle adapter when all slots are taken."""

    def __init__(self, load: Load, unload: Unload, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._load, self._unload, self._capacity, self._clock = load, unload, capacity, clock
        self._entries: dict[str, _Entry] = {}
        self._changed = asyncio.Condition()
        self.loads = self.evictions = 0

    def resident(self) -> list[str]:
        """Keys of the adapters loaded (or loading) now."""
        return sorted(self._entries)

    def refs(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.refs if entry else 0

    async def acquire(self, ref: AdapterRef) -> str:
        """Pin `ref`'s adapter for one request (loading it if needed); returns its key."""
        key = ref.key
        entry = self._entries.get(key)
        if entry is None:
            await self._make_room()
            entry = self._entries.get(key)  # another request may have started it meanwhile
        if entry is None:
            entry = self._entries[key] = _Entry(asyncio.get_running_loop().create_future())
            asyncio.ensure_future(self._load_entry(ref, entry))
        entry.refs += 1
        entry.last_used = self._clock()
        try:
            await asyncio.shield(entry.loaded)
        except BaseException:
            await self.release(key)
            raise
        return key

    async def release(self, key: str) -> None:
        """Unpin one use of `key`."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.refs -= 1
            entry.last_used = self._clock()
        async with self._changed:
            self._changed.notify_all()

    async def _load_entry(self, ref: AdapterRef, entry: _Entry) -> None:
        try:
            await self._load(ref)
        except BaseException as exc:
            del self._entries[ref.key]
            entry.loaded.set_exception(exc)
            entry.loaded.exception()  # retrieved: waiters re-raise it
            async with self._changed:
                self._changed.notify_all()
            return
        self.loads += 1
        entry.loaded.set_result(None)

    async def _make_room(self) -> None:
        """Evict idle adapters (least recently used first) until a slot is free; wait
        for a release when every resident adapter is in use."""
        async with self._changed:
            while len(self._entries) >= self._capacity:
                idle = [(e.last_used, k) for k, e in self._entries.items() if e.refs == 0 and e.loaded.done()]
                if not idle:
                    await self._changed.wait()
                    continue
                _, victim = min(idle)
                del self._entries[victim]
                self.evictions += 1
                log.info("adapter %s evicted (least recently used)", victim)
                await self._unload(victim)
