"""SamplerCore's per-tenant quota of rows in flight: counted before any await (so
concurrent requests cannot all pass), refused with RESOURCE_EXHAUSTED
[SAMPLE_ROWS_QUOTA], given back when a request ends, however it ends."""

from __future__ import annotations

import asyncio

import pytest

from tunemesh.errors import Code, ResourceExhaustedError
from tunemesh_sampler.adapters import AdapterCache, AdapterRef
from tunemesh_sampler.core import SamplerCore
from tunemesh_sampler.domain import ModelInfo, SampledSequence, SamplingSpec, StopReason

SPEC = SamplingSpec(max_tokens=2)


class _HeldEngine:
    """Generation waits for `go`; a prompt starting with 0 fails."""

    info = ModelInfo("tiny", "dense", 256, 128, 8)

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.rows = 0  # rows inside the engine now

    async def generate(self, request):
        self.rows += request.num_samples
        try:
            await self.go.wait()
            if request.prompt_tokens[0] == 0:
                raise RuntimeError("engine failure")
            return [SampledSequence((1, 2), (0.0, 0.0), StopReason.LENGTH)] * request.num_samples
        finally:
            self.rows -= request.num_samples

    async def prompt_logprobs(self, key, tokens):
        self.rows += 1
        try:
            await self.go.wait()
            return [0.0] * len(tokens)
        finally:
            self.rows -= 1


async def _no_load(ref: AdapterRef) -> None:
    await asyncio.sleep(0)  # loading awaits: requests interleave here


async def _no_unload(key: str) -> None:
    pass


def _core(limit: int) -> tuple[SamplerCore, _HeldEngine]:
    engine = _HeldEngine()
    return SamplerCore(engine, AdapterCache(_no_load, _no_unload, 4), max_rows_per_tenant=limit), engine


def test_concurrent_requests_of_a_tenant_stop_at_its_row_quota():
    async def main():
        core, engine = _core(16)
        ref = AdapterRef("alice", "tunemesh://runs/r/sampler/a")
        tasks = [asyncio.create_task(core.sample("alice", ref, (1, 2), 4, SPEC)) for _ in range(10)]
        bob = asyncio.create_task(core.sample("bob", None, (1,), 16, SPEC))  # another tenant has its own
        for _ in range(20):
            await asyncio.sleep(0)
        refused = [t for t in tasks if t.done()]
        assert len(refused) == 6 and core.rows_in_flight("alice") == 16 and engine.rows == 16 + 16
        for task in refused:
            error = task.exception()
            assert isinstance(error, ResourceExhaustedError)
            assert (error.reason, error.rpc_code) == ("SAMPLE_ROWS_QUOTA", Code.RESOURCE_EXHAUSTED)
        with pytest.raises(ResourceExhaustedError):
            await core.compute_logprobs("alice", None, (1, 2))
        engine.go.set()
        assert [len(r) for r in await asyncio.gather(*[t for t in tasks if t not in refused])] == [4] * 4
        assert len(await bob) == 16
        assert core.rows_in_flight("alice") == core.rows_in_flight("bob") == 0
        await core.compute_logprobs("alice", None, (1, 2))

    asyncio.run(main())


def test_rows_are_given_back_when_a_request_fails_or_is_cancelled():
    async def main():
        core, engine = _core(4)
        failing = asyncio.create_task(core.sample("alice", None, (0,), 2, SPEC))
        cancelled = asyncio.create_task(core.sample("alice", None, (1,), 2, SPEC))
        await asyncio.sleep(0)
        assert core.rows_in_flight("alice") == 4
        cancelled.cancel()
        engine.go.set()
        with pytest.raises(RuntimeError):
            await failing
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert core.rows_in_flight("alice") == 0
        assert len(await core.sample("alice", None, (1,), 4, SPEC)) == 4

    asyncio.run(main())


def test_a_request_larger_than_the_quota_runs_alone_and_no_limit_means_none():
    async def main():
        core, engine = _core(4)
        engine.go.set()
        assert len(await core.sample("alice", None, (1,), 8, SPEC)) == 8  # nothing else in flight: admitted
        unlimited, engine = _core(0)
        tasks = [asyncio.create_task(unlimited.sample("alice", None, (1,), 64, SPEC)) for _ in range(8)]
        await asyncio.sleep(0)
        assert unlimited.rows_in_flight("alice") == 512
        engine.go.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
