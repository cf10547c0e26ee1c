"""Prometheus metrics of every tunemesh service; docs/metrics.md lists each one.

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


# ---- scheduler -----------------------------------------------------------------------


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


# ---- trainer -------------------------------------------------------------------------


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


# ---- sampler -------------------------------------------------------------------------


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
        return _timed(self._load)

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


# ---- checkpoint ----------------------------------------------------------------------


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
        return _timed(self._op, name)

    def observe_op(self, name: str, seconds: float, result: str = "ok") -> None:
        self._op.labels(name, result).observe(seconds)


def result_of(exc: BaseException | None) -> str:
    """The `result` label of an operation that raised `exc` (None: it did not)."""
    if exc is None:
        return "ok"
    return "not_found" if isinstance(exc, NotFoundError) else "error"


@contextlib.contextmanager
def _timed(histogram: Histogram, *labels: str) -> Iterator[None]:
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
    """`GET /metrics` over one-shot HTTP connections, answered on the event loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self.url = ""

    @classmethod
    async def start(cls, listen: str, registry: CollectorRegistry = prometheus_client.REGISTRY,
                    advertise_host: str = "") -> MetricsEndpoint | None:
        """Serve on `listen` (`host:port`, port 0 picks one); None when `listen` is empty.
        The URL names `advertise_host` if given, else the listen host (this machine's
        name for a wildcard)."""
        if not listen:
            return None
        prometheus_client.disable_created_metrics()  # no `*_created` series next to each counter
        host, _, port = listen.rpartition(":")
        endpoint = cls(registry)
        endpoint._server = await asyncio.start_server(endpoint._answer, host or None, int(port))
        bound = endpoint._server.sockets[0].getsockname()[1]
        if not advertise_host:
            advertise_host = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
        endpoint.url = f"http://{advertise_host}:{bound}/metrics"
        return endpoint

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            if method in ("GET", "HEAD") and path.split("?", 1)[0] == "/metrics":
                status, kind, body = "200 OK", prometheus_client.CONTENT_TYPE_LATEST, \
                    prometheus_client.generate_latest(self._registry)
            else:
                status, kind, body = "404 Not Found", "text/plain", b"only /metrics is served here\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()
