"""AdapterCache: one load per key, LRU eviction of idle adapters only, waits when all are busy."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh.errors import NotFoundError
from tunemesh_sampler.adapters import AdapterCache, AdapterRef


class FakeEngine:
    def __init__(self, fail: set[str] = frozenset(), delay: float = 0.0) -> None:
        self.loaded: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.fail, self.delay = fail, delay

    async def load(self, ref: AdapterRef) -> None:
        self.events.append(("load", ref.path))
        await asyncio.sleep(self.delay)
        if ref.path in self.fail:
            raise NotFoundError("CHECKPOINT_NOT_FOUND", ref.path)
        self.loaded.append(ref.key)

    async def unload(self, key: str) -> None:
        self.events.append(("unload", key))
        self.loaded.remove(key)


def ref(name: str, tenant: str = "alice") -> AdapterRef:
    return AdapterRef(tenant, f"tunemesh://runs/r/sampler/{name}")


def run(coro):
    return asyncio.run(coro)


def test_keys_pin_tenant_and_path():
    assert ref("a").key == ref("a").key
    assert ref("a").key != ref("a", tenant="bob").key != ref("b").key
    assert "alice" not in ref("a").key


def test_concurrent_first_uses_load_once():
    async def main():
        engine = FakeEngine(delay=0.05)
        cache = AdapterCache(engine.load, engine.unload, capacity=2)
        keys = await asyncio.gather(*(cache.acquire(ref("a")) for _ in range(5)))
        assert len(set(keys)) == 1 and engine.events == [("load", ref("a").path)]
        assert cache.refs(keys[0]) == 5
        for key in keys:
            await cache.release(key)
        assert cache.refs(keys[0]) == 0

    run(main())


def test_least_recently_used_idle_adapter_is_evicted_and_reloaded():
    async def main():
        engine = FakeEngine()
        cache = AdapterCache(engine.load, engine.unload, capacity=2)
        now = [0.0]
        cache._clock = lambda: now[0]
        for name in ("a", "b", "a"):  # a used last
            now[0] += 1
            await cache.release(await cache.acquire(ref(name)))
        now[0] += 1
        await cache.release(await cache.acquire(ref("c")))  # evicts b, the least recently used
        assert set(cache.resident()) == {ref("a").key, ref("c").key}
        assert ("unload", ref("b").key) in engine.events
        await cache.release(await cache.acquire(ref("b")))  # transparently reloaded
        assert engine.events.count(("load", ref("b").path)) == 2
        assert (cache.loads, cache.evictions) == (4, 2)

    run(main())


def test_an_adapter_in_use_is_never_unloaded_and_a_full_cache_waits():
    async def main():
        engine = FakeEngine()
        cache = AdapterCache(engine.load, engine.unload, capacity=1)
        busy = await cache.acquire(ref("a"))
        waiting = asyncio.ensure_future(cache.acquire(ref("b")))
        await asyncio.sleep(0.05)
        assert not waiting.done() and engine.loaded == [busy]  # a is in use: b waits
        await cache.release(busy)
        key_b = await asyncio.wait_for(waiting, 1)
        assert engine.loaded == [key_b] and ("unload", busy) in engine.events

    run(main())


def test_a_failed_load_raises_for_every_waiter_and_leaves_no_entry():
    async def main():
        engine = FakeEngine(fail={ref("bad").path}, delay=0.02)
        cache = AdapterCache(engine.load, engine.unload, capacity=2)
        results = await asyncio.gather(*(cache.acquire(ref("bad")) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, NotFoundError) for r in results)
        assert cache.resident() == []
        await cache.release(await cache.acquire(ref("ok")))  # the cache still works

    run(main())


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        AdapterCache(FakeEngine().load, FakeEngine().unload, capacity=0)
