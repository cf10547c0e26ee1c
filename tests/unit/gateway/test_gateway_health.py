"""The gateway's health as a service of the mesh: GET /healthz follows whether the scheduler
answers (`SchedulerProbe`, grpc.health.v1 on the gateway's channel, against a real in-process
gRPC server), and the HTTPS listener's files are checked before serving."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tunemesh_common.security import pki
from tunemesh_gateway import settings as settings_mod
from tunemesh_gateway.__main__ import SchedulerProbe
from tunemesh_gateway.app import create_app
from tunemesh_gateway.store import MemoryStore


def test_healthz_is_503_until_the_scheduler_answers(upstream):
    answers = {"now": False}
    with TestClient(create_app(lambda: upstream, MemoryStore(), ready=lambda: answers["now"])) as client:
        down = client.get("/healthz")
        assert down.status_code == 503 and "scheduler" in down.json()["detail"]
        answers["now"] = True
        assert client.get("/healthz").status_code == 200
        assert b"tunemesh_gateway_requests" in client.get("/metrics").content
    assert upstream.calls == []  # no call of the scheduler's API, no API key needed


def test_the_probe_follows_the_scheduler_s_health():
    async def scenario() -> list[bool]:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        probe = SchedulerProbe(timeout_s=1.0)
        seen = [await probe.check()]  # no channel yet: the app has not started
        probe.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        seen.append(await probe.check())  # nothing listening yet
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        seen.append(await probe.check())
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        seen.append(await probe.check())
        await server.stop(None)
        seen.append(await probe.check())
        await probe.channel.close()
        return seen

    assert asyncio.run(scenario()) == [False, False, False, True, False]


def test_the_https_files_go_together_and_must_be_pem(tmp_path: pathlib.Path):
    cert, key = pki.Authority.create().issue("tunemesh-gateway", ["gateway.tunemesh"]).write(tmp_path, "gateway")
    assert settings_mod.listener_tls(settings_mod.load([])) is None  # plain HTTP
    assert settings_mod.listener_tls(settings_mod.load(["--tls-cert", str(cert), "--tls-key", str(key)])) == (cert, key)
    with pytest.raises(SystemExit, match="--tls-cert and --tls-key go together"):
        settings_mod.listener_tls(settings_mod.load(["--tls-cert", str(cert)]))
    with pytest.raises(SystemExit, match="is not PEM"):
        settings_mod.listener_tls(settings_mod.load(["--tls-cert", str(key), "--tls-key", str(key)]))
    with pytest.raises(SystemExit, match="cannot read"):
        settings_mod.listener_tls(settings_mod.load(["--tls-cert", str(tmp_path / "no.pem"), "--tls-key", str(key)]))
