"""Prometheus metrics of the gateway, recorded once per HTTP request by the app's middleware."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from tunemesh_common.service.metrics import LATENCY_BUCKETS, private_registry


class GatewayMetrics:
    """Requests by Tinker endpoint (the route's path template) and HTTP status."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = private_registry(registry)
        self.registry = registry
        self._requests = Counter("tunemesh_gateway_requests", "HTTP requests answered",
                                 ["endpoint", "status"], registry=registry)
        self._seconds = Histogram("tunemesh_gateway_request_duration_seconds", "time to answer one HTTP request",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self._seconds.labels(endpoint).observe(seconds)
