"""A small forward of the torch sampler (a decode step or prefill of tiny-dense) runs on one
thread, a large one on torch's threads; in batch-invariant mode the sampled tokens and
their logprobs are the same bits either way."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tunemesh_common.numerics import batch_invariant
from tunemesh_sampler.domain import GenerateRequest, SamplingSpec
from tunemesh_sampler.engine import torch_engine

pytestmark = pytest.mark.skipif(batch_invariant._THREAD_LOCAL is None,
                                reason="this torch build has no per-thread thread counts (one_thread is a no-op)")

PROMPTS = [[5, 6, 7, 8, 9], [60, 61, 62], [100, 3, 17, 42, 8, 8, 1]]


def _generate(engine, key: str | None) -> list[tuple[list[int], list[float]]]:
    spec = SamplingSpec(max_tokens=12, temperature=0.0, stop_token_ids=())

    async def run():
        return await asyncio.gather(*(engine.generate(GenerateRequest(
            adapter_key=key, prompt_tokens=tuple(p), num_samples=1, spec=spec, tenant=f"t{i}"))
            for i, p in enumerate(PROMPTS)))

    return [(list(seq.tokens), list(seq.logprobs)) for result in asyncio.run(run()) for seq in result]


@pytest.fixture
def worker_on_two_threads(engine):
    """The engine's worker thread (where forwards run) on two threads: a thread's count is
    its own, and the worker kept whatever count the thread that started it had."""
    saved = engine._executor.submit(torch.get_num_threads).result()
    engine._executor.submit(torch.set_num_threads, 2).result()
    yield
    engine._executor.submit(torch.set_num_threads, saved).result()


@pytest.mark.parametrize("key", [None, "a2"])
def test_small_forwards_run_on_one_thread_with_the_same_bits_as_on_two(engine, key, worker_on_two_threads,
                                                                         monkeypatch):
    seen: list[int] = []
    hook = engine._model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    body = engine._body.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        one = _generate(engine, key)
        assert seen and set(seen) == {1}  # every prefill and decode step of tiny-dense
        seen.clear()
        monkeypatch.setattr(torch_engine, "ONE_THREAD_WORK", 0)  # every forward is "large"
        two = _generate(engine, key)
        assert seen and set(seen) == {2}
    finally:
        hook.remove()
        body.remove()
    assert one == two  # tokens and logprobs, bit for bit
