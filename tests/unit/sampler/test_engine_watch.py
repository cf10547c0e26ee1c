"""The sampler process leaves when its engine reports a failure (vLLM's engine core died):
`watch_engine` sets the event the main loop waits on."""

from __future__ import annotations

import asyncio

from tunemesh_sampler.__main__ import watch_engine


class _Engine:
    def __init__(self, healthy_checks: int) -> None:
        self.checks = 0
        self._healthy = healthy_checks

    def failure(self) -> str | None:
        self.checks += 1
        return None if self.checks <= self._healthy else "engine core stopped"


def test_a_failed_engine_sets_the_event_and_a_healthy_one_does_not():
    async def main():
        failing, failed = _Engine(healthy_checks=3), asyncio.Event()
        await asyncio.wait_for(watch_engine(failing, failed, 0), 5)
        assert failed.is_set() and failing.checks == 4

        healthy, untouched = _Engine(healthy_checks=10**9), asyncio.Event()
        task = asyncio.create_task(watch_engine(healthy, untouched, 0))
        for _ in range(20):
            await asyncio.sleep(0)
        task.cancel()
        assert not untouched.is_set() and healthy.checks > 1

    asyncio.run(main())
