"""`python -m tunemesh_gateway`: Tinker's HTTP protocol in front of the scheduler.

    python -m tunemesh_gateway --scheduler 127.0.0.1:50051 --ca-bundle ~/.tunemesh/mesh/ca.pem
    TINKER_BASE_URL=http://127.0.0.1:8000 TINKER_API_KEY=tml-... python my_tinker_script.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import socket

import prometheus_client
import uvicorn

from tunemesh_common.membership import registry
from tunemesh_common.service import rpc
from tunemesh_gateway import settings as settings_mod
from tunemesh_gateway.app import create_app
from tunemesh_gateway.core import CoreConfig
from tunemesh_gateway.etcd_store import EtcdStore
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


def bind(listen: str) -> socket.socket:
    """A listening socket on `host:port` (port 0: a free one), bound before serving so the
    address is known and written to the ready file."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)
    return sock


def write_ready(path: pathlib.Path, address: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), "metrics_url": f"http://{address}/metrics"}))
    os.replace(tmp, path)


async def serve(s: settings_mod.GatewaySettings) -> None:
    try:
        creds = credentials(s.ca_bundle, s.insecure)
    except ValueError as err:
        raise SystemExit(f"python -m tunemesh_gateway: {err}") from None
    store = EtcdStore(registry.connect(s.etcd, tls=settings_mod.etcd_tls(s))) if s.etcd else MemoryStore()
    app = create_app(lambda: GrpcUpstream(s.scheduler, creds), store, core_config(s),
                     GatewayMetrics(prometheus_client.REGISTRY))
    sock = bind(s.listen)
    host, port = sock.getsockname()[:2]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_keep_alive=75,
                                           timeout_graceful_shutdown=5))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        log.info("gateway on http://%s, scheduler %s (%s), tables %s", address, s.scheduler,
                 "plaintext" if creds is None else "TLS", f"in etcd {s.etcd}" if s.etcd else "in memory")
        if s.ready_file:
            write_ready(s.ready_file, address)
    await serving


def main(argv: list[str] | None = None) -> None:
    rpc.configure_logging()
    asyncio.run(serve(settings_mod.load(argv)))


if __name__ == "__main__":
    main()
