"""`python -m tunemesh_gateway`: Tinker's HTTP protocol in front of the scheduler.

    python -m tunemesh_gateway --scheduler 127.0.0.1:50051 --ca-bundle ~/.tunemesh/mesh/ca.pem
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python my_tinker_script.py

With --tls-cert / --tls-key it serves HTTPS; the tinker SDK (httpx) then trusts the mesh CA
through `SSL_CERT_FILE=<ca.pem>` (`tunemesh up` starts it so and prints the line). GET
/healthz answers 200 while the scheduler answers its health check, 503 otherwise; with
--metrics-listen a plaintext /metrics, /healthz and /readyz endpoint (the one every
service has) serves Prometheus and probes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

import grpc
import prometheus_client
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tunemesh_common.membership import registry
from tunemesh_common.service import api_keys, rpc
from tunemesh_common.service.host import write_ready_file
from tunemesh_common.service.metrics import MetricsEndpoint
from tunemesh_common.service.throttle import FailureThrottle
from tunemesh_gateway import settings as settings_mod
from tunemesh_gateway.app import create_app
from tunemesh_gateway.core import CoreConfig
from tunemesh_gateway.etcd_store import EtcdStore
from tunemesh_gateway.key_guard import KeyCheck, KeyGuard
from tunemesh_gateway.metrics import GatewayMetrics
from tunemesh_gateway.store import MemoryStore
from tunemesh_gateway.upstream import GrpcUpstream, credentials

log = logging.getLogger("tunemesh_gateway")


def core_config(s: settings_mod.GatewaySettings) -> CoreConfig:
    return CoreConfig(
        call_timeout_s=s.call_timeout_s, create_timeout_s=s.create_timeout_s, sample_timeout_s=s.sample_timeout_s,
        poll_wait_s=s.poll_wait_s, max_samples_per_call=s.max_samples_per_call,
        max_inflight_samples=s.max_inflight_samples, result_ttl_s=s.result_ttl_s,
        unnamed_sampler_ttl_s=s.unnamed_sampler_ttl_s, fwdbwd_max_chunk_bytes=s.fwdbwd_max_chunk_bytes)


def key_check(s: settings_mod.GatewaySettings) -> KeyCheck | None:
    """Keys verified here against the mesh's keys file (--api-keys-file), else None (a KeyGuard)."""
    if s.api_keys_file is None:
        return None
    try:
        ring = api_keys.KeyRing(s.api_keys_file, check_every_s=s.api_keys_check_s)
    except api_keys.KeyFileError as err:
        raise SystemExit(f"python -m tunemesh_gateway: --api-keys-file: {err}") from None
    return KeyCheck(api_keys.KeyAuthenticator(ring, FailureThrottle(max_failures=s.max_client_failures)))


def bind(listen: str) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one), bound before serving so the
    address is known and written to the ready file."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections of a
    # socket that says it is TCP. With Nagle on, a response's body waited for the client's
    # delayed ACK of its headers: every request on a kept-alive connection took 40 ms more.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    return sock


class SchedulerProbe:
    """Whether the scheduler answers: grpc.health.v1 (no API key needed) on the gateway's
    own channel to it, asked every `period_s` (sooner while it does not answer). The
    gateway's /healthz and the metrics endpoint's /readyz read `reachable`."""

    def __init__(self, period_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.period_s, self.timeout_s = period_s, timeout_s
        self.channel: grpc.aio.Channel | None = None  # the upstream's, once the app has started
        self.reachable = False

    async def check(self) -> bool:
        if self.channel is None:
            return False
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def watching(self, make_upstream: Callable[[], GrpcUpstream]) -> Callable[[], GrpcUpstream]:
        """`make_upstream`, also handing this probe the channel of the upstream it makes."""
        def made() -> GrpcUpstream:
            upstream = make_upstream()
            self.channel = upstream.channel
            return upstream

        return made

    async def run(self) -> None:
        while True:
            reachable = await self.check()
            if reachable != self.reachable:
                log.log(logging.INFO if reachable else logging.WARNING, "the scheduler is %s",
                        "reachable" if reachable else "not reachable")
            self.reachable = reachable
            await asyncio.sleep(self.period_s if reachable else min(self.period_s, 0.5))


async def serve(s: settings_mod.GatewaySettings) -> None:
    try:
        creds = credentials(s.ca_bundle, s.insecure)
    except ValueError as err:
        raise SystemExit(f"python -m tunemesh_gateway: {err}") from None
    https = settings_mod.listener_tls(s)
    keys = key_check(s)
    store = EtcdStore(registry.connect(s.etcd, tls=settings_mod.etcd_tls(s))) if s.etcd else MemoryStore()
    probe = SchedulerProbe()
    guard = keys or KeyGuard(FailureThrottle(max_failures=s.max_client_failures))
    app = create_app(probe.watching(lambda: GrpcUpstream(s.scheduler, creds)), store, core_config(s),
                     GatewayMetrics(prometheus_client.REGISTRY), ready=lambda: probe.reachable, keys=guard)
    endpoint = await MetricsEndpoint.start(s.metrics_listen, prometheus_client.REGISTRY,
                                           ready=lambda: probe.reachable)
    sock = bind(s.listen)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"{'https' if https else 'http'}://{address}"
    certfile, keyfile = https or (None, None)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_keep_alive=75,
                                           timeout_graceful_shutdown=5, ssl_certfile=certfile, ssl_keyfile=keyfile))
    # uvicorn shuts down on SIGTERM, then raises it again under the handler it found: a quiet
    # one here lets the cleanup below run and the process exit 0 (the default would kill it).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    probing = None
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            probing = asyncio.create_task(probe.run(), name="scheduler probe")
            log.info("gateway on %s, scheduler %s (%s), tables %s, API keys %s", url, s.scheduler,
                     "plaintext" if creds is None else "TLS", f"in etcd {s.etcd}" if s.etcd else "in memory",
                     f"verified here ({s.api_keys_file})" if keys else "checked by the scheduler")
            if s.ready_file:
                write_ready_file(s.ready_file, {"address": address, "url": url, "pid": os.getpid(),
                                                "metrics_url": endpoint.url if endpoint else f"{url}/metrics"})
        await serving
    finally:
        if probing is not None:
            probing.cancel()
            await asyncio.wait([probing])
        if endpoint is not None:
            await endpoint.close()
        log.info("gateway stopped")


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
