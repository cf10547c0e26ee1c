"""Prometheus metrics of the scheduler (queues, fused batches, operations, sampling tokens); docs/metrics.md lists each one."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram

from tunemesh_common.service.metrics import (
    ITEM_BUCKETS, LATENCY_BUCKETS, TOKEN_BUCKETS, ReadingsCollector, private_registry,
)

class SchedulerMetrics:
    """Queues, fused batches and operations of the scheduler."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = private_registry(registry)
        self._queue_wait = Histogram(
            "tunemesh_scheduler_queue_wait_seconds", "time from an operation's submission until a trainer gets it",
            ["tenant"], buckets=LATENCY_BUCKETS, registry=registry)
        self._finished = Counter("tunemesh_scheduler_operations_finished", "operations finished, by final state",
                                 ["tenant", "kind", "state"], registry=registry)
        self._tokens = Counter("tunemesh_scheduler_tokens", "tokens of forward work handed to trainers",
                               ["tenant", "kind"], registry=registry)
        self._sampling = Counter("tunemesh_scheduler_sampling_tokens", "tokens of sampling requests served, per tenant",
                                 ["tenant", "kind"], registry=registry)
        self._batch_items = Histogram("tunemesh_scheduler_batch_items", "operations per fused batch", ["trainer"],
                                      buckets=ITEM_BUCKETS, registry=registry)
        self._batch_tokens = Histogram("tunemesh_scheduler_batch_tokens", "tokens per fused batch", ["trainer"],
                                       buckets=TOKEN_BUCKETS, registry=registry)

    def queue_wait(self, tenant: str, seconds: float) -> None:
        self._queue_wait.labels(tenant).observe(max(0.0, seconds))

    def operation_finished(self, tenant: str, kind: str, state: str) -> None:
        self._finished.labels(tenant, kind.lower(), state).inc()

    def tokens(self, tenant: str, kind: str, count: int) -> None:
        self._tokens.labels(tenant, kind.lower()).inc(count)

    def sampling_tokens(self, tenant: str, kind: str, count: int) -> None:
        """`kind`: `prompt` / `generated` (Sample) or `logprobs` (ComputeLogprobs)."""
        self._sampling.labels(tenant, kind).inc(count)

    def batch(self, trainer: str, items: int, tokens: int) -> None:
        self._batch_items.labels(trainer).observe(items)
        self._batch_tokens.labels(trainer).observe(tokens)

    def follow(self, snapshot: Callable[[], dict], nodes: Callable[[], dict[str, int]]) -> None:
        """Gauges read from `SchedulerCore.snapshot()` and the node directories' sizes."""
        gauges = [
            ("tunemesh_scheduler_queue_depth", "operations submitted, not yet handed to a trainer", ("tenant",),
             lambda: _keyed(snapshot()["queued_by_tenant"])),
            ("tunemesh_scheduler_operations", "operations held, by state", ("state",),
             lambda: _keyed(snapshot()["operations_by_state"])),
            ("tunemesh_scheduler_ready_depth", "operations ready for a trainer's next batch", ("trainer",),
             lambda: {(n,): d["ready"] for n, d in snapshot()["nodes"].items()}),
            ("tunemesh_scheduler_runs", "training runs held", (), lambda: {(): snapshot()["runs"]}),
            ("tunemesh_scheduler_sessions_open", "open sessions", (), lambda: {(): snapshot()["sessions_open"]}),
            ("tunemesh_scheduler_nodes", "nodes registered in etcd, as the scheduler sees them", ("role",),
             lambda: _keyed(nodes())),
        ]
        for name, doc, labels, read in gauges:
            self.registry.register(ReadingsCollector(name, doc, labels, read))


def _keyed(counts: Mapping[str, float]) -> dict[tuple[str, ...], float]:
    return {(key,): value for key, value in counts.items()}
