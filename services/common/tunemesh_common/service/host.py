"""The service host: what every service process does around its servicers.

One async context manager starts, in order, the metrics endpoint (`/metrics`, `/healthz`,
and `/readyz`: 200 once serving, for probes that cannot speak TLS), a grpc.aio server (the
error/auth and metrics interceptors, health answering NOT_SERVING, reflection), binds and
starts it, marks it serving, runs the service's registrations (its etcd node record) and
writes the ready file; then it owns the service's background tasks. On the way out —
normal return, SIGTERM / SIGINT, or an exception at any step — it undoes what was done, in reverse
order, each step even if another failed: health NOT_SERVING first, background tasks
cancelled, registrations undone, `server.stop(grace)`, the service's own resources (its
`on_stop` callbacks, newest first), then the metrics endpoint.

    async with ServiceHost(HostConfig("sampler", s.listen, s.metrics_listen, ...)) as host:
        servicer = SamplerServicer(s.node_id, host.bind(), ...)   # the address others use
        host.add_servicer(add_SamplerServiceServicer_to_server, servicer, SERVICE_NAME)
        await host.start()                         # accepting calls, health NOT_SERVING
        engine = await asyncio.to_thread(load)     # a signal meanwhile ends the start-up
        host.on_stop(engine.close)                 # runs once the server has stopped
        await host.serve(registrations=[...], ready={"node_id": s.node_id})
        host.spawn(refresh_periodically(), "refresh")  # cancelled and awaited at shutdown
        await host.wait()                          # until SIGTERM / SIGINT

A signal before `wait()` (a model still loading, a standby campaigning) cancels the
start-up and the host leaves quietly, as after a signal in `wait()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import pathlib
import signal
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tunemesh_common.service import metrics
from tunemesh_common.service.rpc import (
    MAX_MESSAGE_BYTES, SERVER_OPTIONS, Authenticator, ErrorInterceptor, MessageLimits, MetricsInterceptor,
)
from tunemesh_common.security.tls import MeshTls, PeerPolicy, PeerRules

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_server(
    authenticator: Authenticator | None = None, rpc_metrics: metrics.RpcMetrics | None = None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES, peer_policy: PeerPolicy | None = None,
    limits: MessageLimits | None = None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with the error/auth interceptor (inside the metrics interceptor
    when `rpc_metrics` is given) and a health servicer (grpc's default: "" SERVING, other
    services unknown; `ServiceHost.start` sets them NOT_SERVING). A request over
    `max_receive_bytes` is refused by gRPC from its length prefix (RESOURCE_EXHAUSTED),
    before it is buffered or decoded."""
    interceptors = [ErrorInterceptor(authenticator, peer_policy, limits)]
    if rpc_metrics is not None:
        interceptors.insert(0, MetricsInterceptor(rpc_metrics))  # the first one is the outermost
    options = [o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    options.append(("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, services: Iterable[str],
                       status: int = health_pb2.HealthCheckResponse.SERVING) -> None:
    """Set the server's health ("") and each service's to `status` (default SERVING)."""
    for name in ["", *services]:
        await health_servicer.set(name, status)


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)


def write_ready_file(path: pathlib.Path, payload: dict) -> None:
    """Publish {"address": ..., "pid": ...} atomically, for launchers to wait on."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def etcd_registration(
    etcd: str, kind: str, node_id: str, value_of: Callable[[], bytes], ttl_s: int, period_s: float,
    registry: CollectorRegistry, service: str, tls: MeshTls | None = None,
) -> AsyncIterator[Any]:
    """A registration for `ServiceHost.serve`: the node's record under `kind` in etcd, held
    under a lease of `ttl_s`, re-read every `period_s` and rewritten when it changed; its
    etcd and lease state in `registry`'s metrics. Revoked (record gone at once) on exit."""
    from tunemesh_common.membership.registry import NodeRegistration

    registration = await NodeRegistration.start_following(etcd, kind, node_id, value_of, ttl_s, period_s, tls=tls)
    try:
        metrics.follow_etcd(registry, service, lambda: registration.etcd_up, lambda: registration.lease_held)
        yield registration
    finally:
        await registration.stop()


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """What the host of one service process needs (a slice of the service's settings)."""

    service: str  # "trainer", "sampler", ...: the `service` label of its RPC metrics
    listen: str  # host:port of the gRPC server; port 0 picks a free one
    metrics_listen: str = ""  # host:port of /metrics (port 0 picks one); empty: no endpoint
    advertise_host: str = ""  # host in the address others use; empty: the listen host
    ready_file: pathlib.Path | None = None  # written once serving: {"address", "pid", "metrics_url", ...}
    authenticator: Authenticator | None = None  # resolves each call's tenant; None: none
    registry: CollectorRegistry = prometheus_client.REGISTRY  # served on /metrics, RPC metrics recorded in it
    grace_s: float = 2.0  # calls in flight at shutdown get this long to finish
    max_receive_bytes: int = MAX_MESSAGE_BYTES  # largest request message accepted
    limits: MessageLimits | None = None  # smaller limits of single RPCs (checked before decoding)
    handle_signals: bool = True  # SIGTERM / SIGINT stop the host (main thread only)
    tls: MeshTls | None = None  # None: plaintext (--insecure)
    # Mesh roles that may call (mutual TLS: a client certificate of the mesh CA is required
    # and must prove one of them), or per method (`tls.PeerPolicy`'s rules); None: any
    # client, server TLS only (the public scheduler).
    peers: PeerRules | frozenset[str] | None = None

    def peer_policy(self) -> PeerPolicy | None:
        return None if self.tls is None or self.peers is None else PeerPolicy(self.service, self.peers)


class ServiceHost:
    """One service's gRPC server and everything around it; see the module docstring."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        self.address = ""  # host:port others use, once bound
        self.metrics_url = ""  # "" without a metrics endpoint
        self._services: list[str] = []
        self._stack = contextlib.AsyncExitStack()
        self._resources = contextlib.AsyncExitStack()
        self._terminated = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._started = self._serving = self._waiting = self._closing = False
        self._aborted_by_signal = False

    async def __aenter__(self) -> ServiceHost:
        self._task = asyncio.current_task()
        async with contextlib.AsyncExitStack() as stack:  # undone here if a step fails
            endpoint = await metrics.MetricsEndpoint.start(  # /readyz: serving (a scheduler: leading)
                self.config.metrics_listen, self.config.registry, self.config.advertise_host,
                ready=lambda: self._serving and not self._closing)
            if endpoint is not None:
                stack.push_async_callback(endpoint.close)
                self.metrics_url = endpoint.url
            await stack.enter_async_context(self._resources)
            self.server, self.health = build_server(
                self.config.authenticator, metrics.RpcMetrics(self.config.service, self.config.registry),
                self.config.max_receive_bytes, self.config.peer_policy(), self.config.limits)
            stack.push_async_callback(self._stop_server)
            self._stack = stack.pop_all()
        if self.config.handle_signals:
            self._handle_signals()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        self._closing = True
        try:
            if self._serving:
                await self.health.enter_graceful_shutdown()  # NOT_SERVING first, for good
        finally:
            try:
                suppress = await self._stack.__aexit__(exc_type, exc, tb)
            finally:
                if self.config.handle_signals:
                    self._restore_signals()
        if self._aborted_by_signal and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            self._task.uncancel()  # our own cancellation (a signal during start-up): a clean stop
            return True
        return suppress

    def bind(self) -> str:
        """Bind the listen address (once); return the address others use (advertise host, bound port)."""
        if not self.address:
            if self.config.tls is None:
                port = self.server.add_insecure_port(self.config.listen)
            else:
                credentials = self.config.tls.server_credentials(client_auth=self.config.peers is not None)
                port = self.server.add_secure_port(self.config.listen, credentials)
            host = self.config.advertise_host or self.config.listen.rsplit(":", 1)[0]
            self.address = f"{host}:{port}"
        return self.address

    def add_servicer(self, add_to_server: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str) -> None:
        """Register `servicer` with its generated `add_..._to_server`; `name`, the service's full
        name, gets health status and reflection. Before `start()`."""
        if self._started:
            raise RuntimeError("servicers are added before the server starts")
        add_to_server(servicer, self.server)
        self._services.append(name)

    async def start(self) -> None:
        """Bind (if not yet), enable reflection and start accepting calls; health answers
        NOT_SERVING (the server's and each service's) until `serve()`."""
        self.bind()
        enable_reflection(self.server, self._services)
        await mark_serving(self.health, self._services, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._started = True

    def on_stop(self, close: Callable[[], Any]) -> None:
        """Call `close()` (and await what it returns) at shutdown, once the server has stopped
        and before the metrics endpoint closes; the latest registered runs first."""

        async def run() -> None:
            result = close()
            if inspect.isawaitable(result):
                await result

        self._resources.push_async_callback(run)

    async def serve(
        self,
        registrations: Iterable[AbstractAsyncContextManager] = (),
        ready: dict[str, Any] | None = None,
    ) -> None:
        """Mark every service SERVING, enter each registration (undone at shutdown, before the
        server stops) and write the ready file (`ready` adds fields). Starts the server first
        if `start()` was not called. Background tasks are `spawn`ed after this."""
        if not self._started:
            await self.start()
        await mark_serving(self.health, self._services)
        self._serving = True
        for registration in registrations:
            await self._stack.enter_async_context(registration)
        self.write_ready(**(ready or {}))

    def write_ready(self, address: str | None = None, **fields: Any) -> None:
        """(Re)write the ready file, if configured: {"address", "pid", "metrics_url", **fields}.
        `address` defaults to the bound one."""
        if self.config.ready_file is None:
            return
        write_ready_file(self.config.ready_file, {"address": address or self.address, "pid": os.getpid(),
                                                  **fields, "metrics_url": self.metrics_url})

    def spawn(self, coro: Coroutine, name: str | None = None) -> asyncio.Task:
        """Run `coro` as a background task owned by the host: cancelled and awaited at
        shutdown (before registrations are undone); an exception it ends with is logged."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_failure)
        self._stack.push_async_callback(_cancel, task)
        return task

    async def wait(self, *events: asyncio.Event) -> asyncio.Event | None:
        """Until SIGTERM / SIGINT or `stop()` (None), or until one of `events` is set (that event)."""
        self._waiting = True
        waiters = {asyncio.ensure_future(e.wait()): e for e in (self._terminated, *events)}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting = False
            for waiter in waiters:
                waiter.cancel()
        if self._terminated.is_set():
            return None
        return next(waiters[w] for w in waiters if w in done)

    def stop(self) -> None:
        """Make `wait()` return (as a signal does)."""
        self._terminated.set()

    async def _stop_server(self) -> None:
        await self.server.stop(self.config.grace_s)

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _restore_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: %s, shutting down", self.config.service, signal.Signals(sig).name)
        self._terminated.set()
        if not (self._waiting or self._closing or self._aborted_by_signal) and self._task is not None:
            self._aborted_by_signal = True
            self._task.cancel()  # still starting: stop now, not once start-up is over


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.wait([task])


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())
