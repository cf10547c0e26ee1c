"""Sampler metrics: generated and prompt tokens from the core, adapter load latency by
result from the loader, and the cache's own counts read at scrape time."""

from __future__ import annotations

import asyncio
import types

from prometheus_client import CollectorRegistry

from tunemesh_common.lora import peft_format
from tunemesh.errors import NotFoundError
from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_sampler.adapters import AdapterCache, AdapterRef
from tunemesh_sampler.checkpoints import AdapterLoader
from tunemesh_sampler.core import SamplerCore
from tunemesh_sampler.domain import ModelInfo, SampledSequence, SamplingSpec, StopReason

INFO = ModelInfo("tiny", "dense", 256, 128, 8)


class _Engine:
    info = INFO

    def __init__(self) -> None:
        self.loaded: list[str] = []

    async def generate(self, request):
        return [SampledSequence(tuple(range(request.spec.max_tokens)), (0.0,) * request.spec.max_tokens,
                                StopReason.LENGTH)] * request.num_samples

    async def prompt_logprobs(self, key, tokens):
        return [0.0] * len(tokens)

    def load_adapter(self, key, directory) -> None:
        self.loaded.append(key)

    def unload_adapter(self, key) -> None:
        self.loaded.remove(key)


class _Storage:
    """Checkpoints by path; others are NotFoundError."""

    async def read(self, tenant: str, path: str):
        if "missing" in path:
            raise NotFoundError("CHECKPOINT_NOT_FOUND", path)
        files = {peft_format.CONFIG_FILE: b"{}", peft_format.WEIGHTS_FILE: b"w"}
        return types.SimpleNamespace(base_model="tiny"), files


def test_tokens_and_adapter_loads_are_recorded(tmp_path):
    registry = CollectorRegistry()
    metrics = SamplerMetrics(registry)
    engine = _Engine()
    loader = AdapterLoader(engine, _Storage(), tmp_path / "cache", metrics)
    core = SamplerCore(engine, AdapterCache(loader.load, loader.unload, 1), metrics)
    metrics.follow(lambda: core.active_requests, lambda: len(core.adapters.resident()),
                   lambda: core.adapters.loads, lambda: core.adapters.evictions, 1)

    async def main():
        await core.sample("alice", AdapterRef("alice", "tunemesh://runs/r/sampler/a"), (1, 2, 3), 2,
                          SamplingSpec(max_tokens=5))
        await core.compute_logprobs("alice", None, (1, 2, 3, 4))
        await core.sample("alice", AdapterRef("alice", "tunemesh://runs/r/sampler/b"), (1,), 1, SamplingSpec(max_tokens=4))
        try:
            await core.sample("alice", AdapterRef("alice", "tunemesh://runs/r/sampler/missing"), (1,), 1,
                              SamplingSpec(max_tokens=4))
        except NotFoundError:
            pass

    asyncio.run(main())
    get = registry.get_sample_value
    assert get("tunemesh_sampler_generated_tokens_total") == 2 * 5 + 4
    assert get("tunemesh_sampler_prompt_tokens_total", {"kind": "sample"}) == 3 + 1
    assert get("tunemesh_sampler_prompt_tokens_total", {"kind": "logprobs"}) == 4
    assert get("tunemesh_sampler_tokens_per_second") == (2 * 5 + 4) / 60
    assert get("tunemesh_sampler_adapter_load_duration_seconds_count", {"result": "ok"}) == 2
    assert get("tunemesh_sampler_adapter_load_duration_seconds_count", {"result": "not_found"}) == 1
    assert get("tunemesh_sampler_adapters_loaded_total") == 2
    assert get("tunemesh_sampler_adapters_evicted_total") == 2  # one slot: a out for b, b out for missing
    assert get("tunemesh_sampler_adapters_resident") == 0
    assert get("tunemesh_sampler_requests_active") == 0
    assert get("tunemesh_sampler_adapter_slots") == 1
