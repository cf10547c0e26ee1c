"""Sampler logic above the engine: pin the request's adapter, generate, unpin."""

from __future__ import annotations

import logging

from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_sampler.adapters import AdapterCache, AdapterRef
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence, SamplingSpec
from tunemesh_sampler.engine import SamplingEngine

log = logging.getLogger(__name__)


class SamplerCore:
    """One engine and the adapters it holds."""

    def __init__(self, engine: SamplingEngine, adapters: AdapterCache, metrics: SamplerMetrics | None = None) -> None:
        self._engine = engine
        self.adapters = adapters
        self.active_requests = 0
        self._metrics = metrics or SamplerMetrics()

    @property
    def info(self) -> ModelInfo:
        return self._engine.info

    async def sample(self, ref: AdapterRef | None, prompt: tuple[int, ...], num_samples: int,
                     spec: SamplingSpec) -> list[SampledSequence]:
        key = await self._pin(ref)
        try:
            sequences = await self._engine.generate(GenerateRequest(key, prompt, num_samples, spec))
        finally:
            await self._unpin(key)
        self._metrics.prompt("sample", len(prompt))
        self._metrics.generated(sum(len(s.tokens) for s in sequences))
        return sequences

    async def compute_logprobs(self, ref: AdapterRef | None, tokens: tuple[int, ...]) -> list[float]:
        key = await self._pin(ref)
        try:
            logprobs = await self._engine.prompt_logprobs(key, tokens)
        finally:
            await self._unpin(key)
        self._metrics.prompt("logprobs", len(tokens))
        return logprobs

    async def _pin(self, ref: AdapterRef | None) -> str | None:
        self.active_requests += 1
        try:
            return await self.adapters.acquire(ref) if ref is not None else None
        except BaseException:
            self.active_requests -= 1
            raise

    async def _unpin(self, key: str | None) -> None:
        self.active_requests -= 1
        if key is not None:
            await self.adapters.release(key)
