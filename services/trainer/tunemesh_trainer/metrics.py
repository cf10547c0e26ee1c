"""Prometheus metrics of the trainer (steps, tokens, adapter slots); docs/metrics.md lists each one."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tunemesh_common.service.metrics import STEP_BUCKETS, ThroughputWindow, private_registry

class TrainerMetrics:
    """Steps, tokens and adapter slots of one trainer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = private_registry(registry)
        self._step = Histogram("tunemesh_trainer_step_duration_seconds", "engine time of one batch",
                               buckets=STEP_BUCKETS, registry=registry)
        self._tokens = Counter("tunemesh_trainer_tokens", "tokens processed", ["kind"], registry=registry)
        self._items = Counter("tunemesh_trainer_items", "items executed", ["kind"], registry=registry)
        self._loaded = Counter("tunemesh_trainer_adapters_loaded", "adapters put into a slot", ["source"],
                               registry=registry)
        self._unloaded = Counter("tunemesh_trainer_adapters_unloaded", "adapters removed from their slot",
                                 registry=registry)
        self._window = ThroughputWindow()
        Gauge("tunemesh_trainer_tokens_per_second", "tokens processed over the last 60 s, per second",
              registry=registry).set_function(self._window.per_second)

    def step(self, seconds: float, tokens_by_kind: Mapping[str, int], items_by_kind: Mapping[str, int]) -> None:
        """One batch: its engine time, its tokens and items by kind."""
        self._step.observe(seconds)
        for kind, count in tokens_by_kind.items():
            self._tokens.labels(kind).inc(count)
        for kind, count in items_by_kind.items():
            self._items.labels(kind).inc(count)
        self._window.add(sum(tokens_by_kind.values()))

    def adapter_loaded(self, source: str) -> None:
        self._loaded.labels(source).inc()

    def adapter_unloaded(self) -> None:
        self._unloaded.inc()

    def follow(self, resident: Callable[[], int], slots: int) -> None:
        """Slot gauges: `resident()` is read at scrape time."""
        Gauge("tunemesh_trainer_adapters_resident", "adapters held in this trainer's slots",
              registry=self.registry).set_function(resident)
        Gauge("tunemesh_trainer_adapter_slots", "adapter slots of this trainer", registry=self.registry).set(slots)
