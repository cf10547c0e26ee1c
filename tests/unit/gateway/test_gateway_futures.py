"""Request ids (what a Tinker future names) and the gateway's background work."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh.errors import UnavailableError
from tunemesh_gateway.core.futures import CREATE, OP, SAMPLE, FutureRef, LocalFutures, Unknown


def test_request_ids_round_trip_and_foreign_text_is_refused():
    refs = [FutureRef(OP, "operations/1b2c", model="s:train:0"), FutureRef(CREATE, "s:train:3"),
            FutureRef(OP, "operations/9", model="s:train:0", session="s", seq=0), FutureRef(SAMPLE, "o/ss/7")]
    for ref in refs:
        assert FutureRef.decode(ref.encode()) == ref
    assert len({ref.encode() for ref in refs}) == len(refs)
    for text in ("operations/1", "tm1.!!!", "tm1." + "e30", "tm1.eyJraW5kIjoiempqIiwia2V5IjoieCJ9", ""):
        with pytest.raises(ValueError):
            FutureRef.decode(text)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_work_runs_once_per_request_id_and_only_its_key_sees_it():
    asyncio.run(_runs_once())


async def _runs_once() -> None:
    clock, started = Clock(), []
    futures = LocalFutures(clock, ttl_s=10)

    async def work() -> str:
        started.append(1)
        await asyncio.sleep(0.01)
        return "done"

    assert futures.start("r1", "alice", SAMPLE, work) and not futures.start("r1", "alice", SAMPLE, work)
    assert futures.running(SAMPLE) == 1
    with pytest.raises(Unknown):
        await futures.wait("r1", "bob", 1.0)
    assert await futures.wait("r1", "alice", 1.0) == (True, "done")
    assert started == [1] and futures.running(SAMPLE) == 0


def test_an_unfinished_wait_times_out_and_failures_raise():
    asyncio.run(_times_out())


async def _times_out() -> None:
    futures = LocalFutures(Clock(), ttl_s=10)
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "late"

    async def broken() -> str:
        raise UnavailableError("NODE_DOWN", "no sampler")

    futures.start("slow", "k", SAMPLE, slow)
    futures.start("broken", "k", SAMPLE, broken)
    assert await futures.wait("slow", "k", 0.01) == (False, None)
    gate.set()
    assert await futures.wait("slow", "k", 1.0) == (True, "late")
    with pytest.raises(UnavailableError):
        await futures.wait("broken", "k", 1.0)
    await futures.close()


def test_finished_work_is_forgotten_after_its_ttl():
    asyncio.run(_forgotten())


async def _forgotten() -> None:
    clock = Clock()
    futures = LocalFutures(clock, ttl_s=10)

    async def quick() -> int:
        return 1

    futures.start("a", "k", CREATE, quick)
    assert await futures.wait("a", "k", 1.0) == (True, 1)
    clock.now = 11.0
    futures.start("b", "k", CREATE, quick)  # a start sweeps
    with pytest.raises(Unknown):
        await futures.wait("a", "k", 0.1)
    await futures.close()
