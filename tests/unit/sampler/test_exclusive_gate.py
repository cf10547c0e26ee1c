"""ExclusiveGate: shared holders together, an exclusive one alone, in arrival order, and a
cancelled waiter blocks no one."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh_sampler.engine.exclusive_gate import ExclusiveGate


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_shared_holders_overlap_an_exclusive_one_waits_and_later_arrivals_queue_behind_it():
    async def scenario():
        gate, log = ExclusiveGate(), []
        release = {name: asyncio.Event() for name in ("s1", "s2", "x", "s3")}

        async def holder(name: str, exclusive: bool):
            async with gate.hold(exclusive):
                log.append(f"+{name}")
                await release[name].wait()
                log.append(f"-{name}")

        tasks = [asyncio.ensure_future(holder(n, n == "x")) for n in ("s1", "s2", "x", "s3")]
        await _settle()
        assert log == ["+s1", "+s2"] and gate.holders == 2 and gate.waiting == 2  # s3 waits behind x
        release["s1"].set()
        await _settle()
        assert log[-1] == "-s1" and gate.holders == 1  # x still waits for s2
        release["s2"].set()
        await _settle()
        assert log[-2:] == ["-s2", "+x"] and gate.holders == -1
        release["x"].set()
        await _settle()
        assert log[-2:] == ["-x", "+s3"]
        release["s3"].set()
        await asyncio.gather(*tasks)
        assert gate.holders == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_lets_the_ones_behind_it_in():
    async def scenario():
        gate = ExclusiveGate()
        inside = asyncio.Event()

        async def hold_shared():
            async with gate.hold(False):
                inside.set()
                await asyncio.Event().wait()

        async def hold(exclusive: bool):
            async with gate.hold(exclusive):
                return gate.holders

        first = asyncio.ensure_future(hold_shared())
        await inside.wait()
        blocked = asyncio.ensure_future(hold(True))  # waits for `first`
        behind = asyncio.ensure_future(hold(False))  # waits behind `blocked`
        await _settle()
        assert not behind.done()
        blocked.cancel()
        assert await asyncio.wait_for(behind, 1) == 2  # in, next to `first`
        with pytest.raises(asyncio.CancelledError):
            await blocked
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert gate.holders == 0 and gate.waiting == 0

    asyncio.run(scenario())
