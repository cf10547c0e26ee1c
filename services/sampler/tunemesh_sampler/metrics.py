"""Prometheus metrics of the sampler (generated tokens, adapter loads); docs/metrics.md lists each one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tunemesh_common.service.metrics import (
    LOAD_BUCKETS, ReadingsCollector, ThroughputWindow, private_registry, timed,
)

class SamplerMetrics:
    """Generated tokens and adapter loads of one sampler."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = private_registry(registry)
        self._generated = Counter("tunemesh_sampler_generated_tokens", "tokens generated", registry=registry)
        self._prompt = Counter("tunemesh_sampler_prompt_tokens", "prompt tokens read", ["kind"], registry=registry)
        self._load = Histogram("tunemesh_sampler_adapter_load_duration_seconds",
                               "time to fetch an adapter and load it into the engine", ["result"],
                               buckets=LOAD_BUCKETS, registry=registry)
        self._window = ThroughputWindow()
        Gauge("tunemesh_sampler_tokens_per_second", "tokens generated over the last 60 s, per second",
              registry=registry).set_function(self._window.per_second)

    def generated(self, tokens: int) -> None:
        self._generated.inc(tokens)
        self._window.add(tokens)

    def prompt(self, kind: str, tokens: int) -> None:
        self._prompt.labels(kind).inc(tokens)

    def adapter_load(self) -> contextlib.AbstractContextManager[None]:
        """Times the block as one adapter load, labelled with its `result`."""
        return timed(self._load)

    def follow(self, active: Callable[[], int], resident: Callable[[], int], loads: Callable[[], int],
               evictions: Callable[[], int], slots: int) -> None:
        """Gauges and counters the sampler's core and adapter cache already keep."""
        Gauge("tunemesh_sampler_requests_active", "Sample / ComputeLogprobs calls in progress",
              registry=self.registry).set_function(active)
        Gauge("tunemesh_sampler_adapters_resident", "adapters held by the engine",
              registry=self.registry).set_function(resident)
        Gauge("tunemesh_sampler_adapter_slots", "adapter slots of this sampler", registry=self.registry).set(slots)
        for name, doc, read in [("tunemesh_sampler_adapters_loaded", "adapters loaded into the engine", loads),
                                ("tunemesh_sampler_adapters_evicted", "idle adapters evicted to free a slot",
                                 evictions)]:
            self.registry.register(ReadingsCollector(name, doc, (), lambda read=read: {(): read()}, "counter"))
