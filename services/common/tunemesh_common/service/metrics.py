"""The Prometheus pieces every tunemesh service's metrics are built from, and the metrics
they share (RPCs, etcd, the node): each service's own set lives in that service
(`tunemesh_<service>/metrics.py`); docs/metrics.md lists every metric.

A service builds its metric set on a registry (the process-wide default in `main`, a
private one otherwise, so tests and libraries never clash), records into it at its
boundaries (the RPC interceptor, a batch, an adapter load, a store call) and serves it
with `MetricsEndpoint`. Values that already live in a service's state are read at
scrape time by callbacks, never copied. The endpoint answers on the event loop, so
those callbacks read loop-owned state without locks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunemesh.errors import NotFoundError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OP_BUCKETS = LATENCY_BUCKETS[:-1]
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
THROUGHPUT_WINDOW_S = 60.0

Readings = Callable[[], Mapping[tuple[str, ...], float]]


def private_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """`registry`, or a fresh one nobody serves (metrics recorded, exported nowhere)."""
    return registry if registry is not None else CollectorRegistry(auto_describe=True)


class ReadingsCollector(Collector):
    """A gauge or counter family whose values `read()` returns at scrape time as
    {label values: value}. A label set seen once and missing later reads 0, so a series
    never vanishes (a tenant's queue depth drops to 0, not to no data)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], read: Readings,
                 kind: str = "gauge") -> None:
        self._name, self._doc, self._labels, self._read, self._kind = name, documentation, labels, read, kind
        self._seen: set[tuple[str, ...]] = set()

    def _family(self):
        cls = CounterMetricFamily if self._kind == "counter" else GaugeMetricFamily
        return cls(self._name, self._doc, labels=self._labels)

    def describe(self):
        yield self._family()

    def collect(self):
        family = self._family()
        try:
            values = {tuple(str(v) for v in key): float(value) for key, value in self._read().items()}
        except Exception:  # one broken reading must not fail the whole scrape
            log.exception("reading %s failed", self._name)
            yield family
            return
        self._seen.update(values)
        for key in sorted(self._seen):
            family.add_metric(list(key), values.get(key, 0.0))
        yield family


class ThroughputWindow:
    """Amount per second over the last `window_s` seconds (written on one thread, read
    on another)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s, self._clock = window_s, clock
        self._events: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self._lock:
            self._events.append((self._clock(), amount))

    def per_second(self) -> float:
        with self._lock:
            horizon = self._clock() - self._window_s
            while self._events and self._events[0][0] < horizon:
                self._events.popleft()
            return sum(amount for _, amount in self._events) / self._window_s


# ---- every service -------------------------------------------------------------------


class RpcCall:
    """One call being served: `finish(code)` records it."""

    def __init__(self, metrics: RpcMetrics, labels: tuple[str, str, str]) -> None:
        self._metrics, self._labels, self._start = metrics, labels, time.perf_counter()
        metrics.in_flight.labels(*labels).inc()

    def finish(self, code: str) -> None:
        m = self._metrics
        m.in_flight.labels(*self._labels).dec()
        m.handled.labels(*self._labels, code).inc()
        m.duration.labels(*self._labels, code).observe(time.perf_counter() - self._start)


class RpcMetrics:
    """gRPC calls of one service by method and final status (`rpc.MetricsInterceptor`)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        registry = private_registry(registry)
        self.service = service
        labels = ["service", "grpc_service", "grpc_method"]
        self.handled = Counter("tunemesh_rpc_handled", "gRPC calls served, by final status",
                               labels + ["grpc_code"], registry=registry)
        self.duration = Histogram("tunemesh_rpc_duration_seconds", "time from a call's arrival to its final status",
                                  labels + ["grpc_code"], buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge("tunemesh_rpc_in_flight", "calls being served now", labels, registry=registry)

    def start(self, full_method: str) -> RpcCall:
        """`full_method` is `/package.Service/Method`."""
        grpc_service, _, grpc_method = full_method.lstrip("/").rpartition("/")
        return RpcCall(self, (self.service, grpc_service, grpc_method))


def follow_etcd(registry: CollectorRegistry, service: str, etcd_up: Callable[[], bool],
                lease_held: Callable[[], bool] | None = None) -> None:
    """`tunemesh_etcd_up` (and `tunemesh_node_lease_held` for registered nodes), read at scrape time."""
    Gauge("tunemesh_etcd_up", "1 while the last exchange with etcd succeeded", ["service"],
          registry=registry).labels(service).set_function(lambda: float(etcd_up()))
    if lease_held is not None:
        Gauge("tunemesh_node_lease_held", "1 while the node's etcd lease was confirmed within its TTL",
              ["service"], registry=registry).labels(service).set_function(lambda: float(lease_held()))


def describe_node(registry: CollectorRegistry, service: str, node_id: str, model: str) -> None:
    """`tunemesh_node_info{service, node_id, model} 1`."""
    Gauge("tunemesh_node_info", "always 1: the node and the base model it serves", ["service", "node_id", "model"],
          registry=registry).labels(service, node_id, model).set(1)


def result_of(exc: BaseException | None) -> str:
    """The `result` label of an operation that raised `exc` (None: it did not)."""
    if exc is None:
        return "ok"
    return "not_found" if isinstance(exc, NotFoundError) else "error"


@contextlib.contextmanager
def timed(histogram: Histogram, *labels: str) -> Iterator[None]:
    """Observe the block's duration under `labels` + its `result_of`."""
    start, result = time.perf_counter(), "error"
    try:
        yield
        result = "ok"
    except BaseException as exc:
        result = result_of(exc)
        raise
    finally:
        histogram.labels(*labels, result).observe(time.perf_counter() - start)


# ---- the /metrics endpoint -----------------------------------------------------------


class MetricsEndpoint:
    """`GET /metrics`, `/healthz` and `/readyz` over one-shot HTTP connections, answered
    on the event loop. Kubernetes probes cannot speak TLS, so this plaintext port is where
    they ask: `/healthz` is 200 while the process (its event loop) runs, `/readyz` 200 once
    `ready()` is true, 503 before (404 without a `ready`)."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool] | None = None) -> None:
        self._registry, self._ready = registry, ready
        self._server: asyncio.Server | None = None
        self.url = ""

    @classmethod
    async def start(cls, listen: str, registry: CollectorRegistry = prometheus_client.REGISTRY,
                    advertise_host: str = "", ready: Callable[[], bool] | None = None) -> MetricsEndpoint | None:
        """Serve on `listen` (`host:port`, port 0 picks one); None when `listen` is empty.
        The URL names `advertise_host` if given, else the listen host (this machine's
        name for a wildcard). `ready` answers `/readyz` (read at each request)."""
        if not listen:
            return None
        prometheus_client.disable_created_metrics()  # no `*_created` series next to each counter
        host, _, port = listen.rpartition(":")
        endpoint = cls(registry, ready)
        endpoint._server = await asyncio.start_server(endpoint._answer, host or None, int(port))
        bound = endpoint._server.sockets[0].getsockname()[1]
        if not advertise_host:
            advertise_host = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        endpoint.url = f"http://{advertise_host}:{bound}/metrics"
        return endpoint

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _reply(self, path: str) -> tuple[str, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        if path == "/metrics":
            return "200 OK", prometheus_client.CONTENT_TYPE_LATEST, prometheus_client.generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz" and self._ready is not None:
            try:
                ready = bool(self._ready())
            except Exception:  # a broken readiness callback reads as not ready, never as a crash
                log.exception("the readiness callback failed")
                ready = False
            return ("200 OK", "text/plain", b"ready\n") if ready else \
                ("503 Service Unavailable", "text/plain", b"not ready\n")
        return "404 Not Found", "text/plain", b"served here: /metrics, /healthz, /readyz\n"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            if method in ("GET", "HEAD"):
                status, kind, body = self._reply(path.split("?", 1)[0])
            else:
                status, kind, body = "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()
