"""Prometheus metrics of the checkpoint service (bytes and store operations); docs/metrics.md lists each one."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram

from tunemesh_common.service.metrics import OP_BUCKETS, private_registry, timed

class CheckpointMetrics:
    """Bytes and store operations of the checkpoint service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = private_registry(registry)
        self._written = Counter("tunemesh_checkpoint_write_bytes", "bytes of checkpoint files written",
                                registry=registry)
        self._read = Counter("tunemesh_checkpoint_read_bytes", "bytes of checkpoint files read", registry=registry)
        self._op = Histogram("tunemesh_checkpoint_op_duration_seconds", "time of one store operation",
                             ["op", "result"], buckets=OP_BUCKETS, registry=registry)

    def written(self, count: int) -> None:
        self._written.inc(count)

    def read(self, count: int) -> None:
        self._read.inc(count)

    def op(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Times the block as store operation `name`, labelled with its `result`."""
        return timed(self._op, name)

    def observe_op(self, name: str, seconds: float, result: str = "ok") -> None:
        self._op.labels(name, result).observe(seconds)
