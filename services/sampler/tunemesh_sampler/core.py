"""Sampler logic above the engine: admit the tenant's rows, pin the request's adapter,
generate, unpin."""

from __future__ import annotations

import asyncio
import logging

from tunemesh_sampler.metrics import SamplerMetrics
from tunemesh_sampler.adapters import AdapterCache, AdapterRef
from tunemesh_sampler.domain import GenerateRequest, ModelInfo, SampledSequence, SamplingSpec
from tunemesh_sampler.engine import SamplingEngine
from tunemesh.errors import ResourceExhaustedError

log = logging.getLogger(__name__)


class SamplerCore:
    """One engine and the adapters it holds.

    A tenant may have at most `max_rows_per_tenant` rows (samples of Sample requests, one
    per ComputeLogprobs) in flight here (0: no limit); a request past that fails
    RESOURCE_EXHAUSTED [SAMPLE_ROWS_QUOTA] at once, which the SDK retries with backoff.
    A request larger than the whole quota is admitted when the tenant has nothing else in
    flight, so no request is refused for good.
    """

    def __init__(self, engine: SamplingEngine, adapters: AdapterCache, metrics: SamplerMetrics | None = None,
                 max_rows_per_tenant: int = 0) -> None:
        self._engine = engine
        self.adapters = adapters
        self.active_requests = 0
        self._metrics = metrics or SamplerMetrics()
        self._max_rows_per_tenant = max_rows_per_tenant
        self._rows: dict[str, int] = {}  # tenant -> rows in flight

    def rows_in_flight(self, tenant: str) -> int:
        return self._rows.get(tenant, 0)

    @property
    def info(self) -> ModelInfo:
        return self._engine.info

    async def sample(self, tenant: str, ref: AdapterRef | None, prompt: tuple[int, ...], num_samples: int,
                     spec: SamplingSpec) -> list[SampledSequence]:
        sequences, _ = await self.sample_and_score(tenant, ref, prompt, num_samples, spec, score_prompt=False)
        return sequences

    async def sample_and_score(self, tenant: str, ref: AdapterRef | None, prompt: tuple[int, ...],
                               num_samples: int, spec: SamplingSpec,
                               score_prompt: bool) -> tuple[list[SampledSequence], list[float]]:
        """`sample`, and with `score_prompt` the prompt's logprobs too (exactly what
        `compute_logprobs` returns: the engine's scoring pass, run alongside the generation
        on the same pinned adapter)."""
        self._admit(tenant, num_samples)
        try:
            key = await self._pin(ref)
            try:
                generated = self._engine.generate(GenerateRequest(key, prompt, num_samples, spec, tenant))
                if score_prompt:  # both end before the adapter is unpinned, whichever fails
                    outcomes = await asyncio.gather(generated, self._engine.prompt_logprobs(key, prompt),
                                                    return_exceptions=True)
                    for outcome in outcomes:
                        if isinstance(outcome, BaseException):
                            raise outcome
                    sequences, logprobs = outcomes
                else:
                    sequences, logprobs = await generated, []
            finally:
                await self._unpin(key)
        finally:
            self._release(tenant, num_samples)
        self._metrics.prompt("sample", len(prompt))
        if score_prompt:
            self._metrics.prompt("logprobs", len(prompt))
        self._metrics.generated(sum(len(s.tokens) for s in sequences))
        return sequences, logprobs

    async def compute_logprobs(self, tenant: str, ref: AdapterRef | None, tokens: tuple[int, ...]) -> list[float]:
        self._admit(tenant, 1)
        try:
            key = await self._pin(ref)
            try:
                logprobs = await self._engine.prompt_logprobs(key, tokens)
            finally:
                await self._unpin(key)
        finally:
            self._release(tenant, 1)
        self._metrics.prompt("logprobs", len(tokens))
        return logprobs

    def _admit(self, tenant: str, rows: int) -> None:
        """Count the rows as the tenant's in flight (before any await), or refuse them."""
        held = self._rows.get(tenant, 0)
        limit = self._max_rows_per_tenant
        if limit and held and held + rows > limit:
            raise ResourceExhaustedError(
                "SAMPLE_ROWS_QUOTA",
                f"the tenant has {held} rows in flight on this sampler; {rows} more would pass its quota of {limit}",
            )
        self._rows[tenant] = held + rows

    def _release(self, tenant: str, rows: int) -> None:
        left = self._rows[tenant] - rows
        if left:
            self._rows[tenant] = left
        else:
            del self._rows[tenant]

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
