"""TLS on the mesh's internal hops, over real grpc.aio servers on loopback with
certificates of a throwaway CA: who may call a trainer, sampler or checkpoint service,
and that a channel to a node reaches only the process proving that node's identity."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from tunemesh.errors import error_from_rpc
from tunemesh_common.security import pki
from tunemesh_common.service import rpc
from tunemesh_common.service.host import HostConfig, ServiceHost
from tunemesh_common.security.tls import MeshTls, PeerPolicy, identity_name, open_channel, role_of

SERVICE = "tunemesh.test.Probe"


@pytest.fixture(scope="module")
def ca() -> pki.Authority:
    return pki.Authority.create()


def _tls(ca: pki.Authority, role: str, node_id: str = "", extra: tuple[str, ...] = ()) -> MeshTls:
    issued = ca.issue(f"tunemesh-{role}", [identity_name(role, node_id), *extra], ["127.0.0.1"])
    return MeshTls(issued.ca_pem, issued.cert_pem, issued.key_pem)


def _add_probe(servicer, server: grpc.aio.Server) -> None:
    """Two methods: Echo (the default rule) and Write (a per-method rule in some tests)."""

    async def echo(request: bytes, context) -> bytes:
        return request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo),
                  "Write": grpc.unary_unary_rpc_method_handler(echo)}),))


async def _serve(tls: MeshTls | None, peers) -> tuple[ServiceHost, str]:
    host = ServiceHost(HostConfig("probe", "127.0.0.1:0", registry=CollectorRegistry(), grace_s=0.2,
                                  handle_signals=False, tls=tls, peers=peers))
    await host.__aenter__()
    host.add_servicer(_add_probe, None, SERVICE)
    await host.serve()
    return host, host.address


async def _call(address: str, tls: MeshTls | None, peer: str, method: str = "Echo") -> str:
    """"OK", or the failed call's status code and reason."""
    async with open_channel(address, tls, peer, rpc.CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            assert await call(b"x", timeout=3) == b"x"
            return "OK"
        except grpc.aio.AioRpcError as err:
            reason = error_from_rpc(err).reason
            return f"{err.code().name} {reason}".strip()


def test_a_trainer_takes_calls_from_the_scheduler_only(ca):
    trainer = _tls(ca, "trainer", "t1")
    peer = identity_name("trainer", "t1")

    async def scenario() -> dict[str, str]:
        host, address = await _serve(trainer, frozenset({"scheduler"}))
        try:
            return {
                "scheduler": await _call(address, _tls(ca, "scheduler"), peer),
                "sampler": await _call(address, _tls(ca, "sampler", "s1"), peer),
                "other trainer": await _call(address, _tls(ca, "trainer", "t2"), peer),
                "other CA": await _call(address, _tls(pki.Authority.create(), "scheduler"), peer),
                "plaintext": await _call(address, None, peer),
            }
        finally:
            await host.__aexit__(None, None, None)

    answers = asyncio.run(scenario())
    assert answers["scheduler"] == "OK"
    assert answers["sampler"] == "PERMISSION_DENIED PEER_NOT_ALLOWED"
    assert answers["other trainer"] == "PERMISSION_DENIED PEER_NOT_ALLOWED"
    # Without a certificate of the mesh CA the handshake itself fails: nothing is served.
    assert answers["other CA"].startswith("UNAVAILABLE")
    assert answers["plaintext"].startswith("UNAVAILABLE")


def test_a_channel_reaches_only_the_node_it_names(ca):
    """A record in etcd that points `t2` at `t1`'s address gets no call through: t1's
    certificate does not prove t2 (the scheduler dispatches by the record's node id)."""

    async def scenario() -> tuple[str, str]:
        host, address = await _serve(_tls(ca, "trainer", "t1"), frozenset({"scheduler"}))
        try:
            scheduler = _tls(ca, "scheduler")
            return (await _call(address, scheduler, identity_name("trainer", "t1")),
                    await _call(address, scheduler, identity_name("trainer", "t2")))
        finally:
            await host.__aexit__(None, None, None)

    right, wrong = asyncio.run(scenario())
    assert right == "OK"
    assert wrong.startswith("UNAVAILABLE")


def test_a_wildcard_certificate_proves_the_role_for_every_node(ca):
    """The chart's shape: all trainers share `*.trainer.tunemesh`."""
    issued = ca.issue("tunemesh-trainer", ["*.trainer.tunemesh"])
    wildcard = MeshTls(issued.ca_pem, issued.cert_pem, issued.key_pem)

    async def scenario() -> str:
        host, address = await _serve(wildcard, frozenset({"scheduler"}))
        try:
            return await _call(address, _tls(ca, "scheduler"), identity_name("trainer", "pod-7"))
        finally:
            await host.__aexit__(None, None, None)

    assert asyncio.run(scenario()) == "OK"


def test_per_method_rules_of_the_checkpoint_service(ca):
    rules = {"": frozenset({"scheduler"}), f"/{SERVICE}/Write": frozenset({"scheduler", "trainer"})}
    peer = identity_name("checkpoint")

    async def scenario() -> dict[tuple[str, str], str]:
        host, address = await _serve(_tls(ca, "checkpoint"), rules)
        try:
            answers = {}
            for role, node in (("scheduler", ""), ("trainer", "t1"), ("sampler", "s1")):
                for method in ("Echo", "Write"):
                    answers[role, method] = await _call(address, _tls(ca, role, node), peer, method)
            return answers
        finally:
            await host.__aexit__(None, None, None)

    answers = asyncio.run(scenario())
    assert answers == {
        ("scheduler", "Echo"): "OK", ("scheduler", "Write"): "OK",
        ("trainer", "Echo"): "PERMISSION_DENIED PEER_NOT_ALLOWED", ("trainer", "Write"): "OK",
        ("sampler", "Echo"): "PERMISSION_DENIED PEER_NOT_ALLOWED",
        ("sampler", "Write"): "PERMISSION_DENIED PEER_NOT_ALLOWED",
    }


def test_the_public_port_is_server_tls_without_a_client_certificate(ca):
    """The scheduler's shape: TLS, no client certificate asked (API keys authenticate)."""

    async def scenario() -> tuple[str, str]:
        host, address = await _serve(_tls(ca, "scheduler", extra=("localhost",)), None)
        try:
            credentials = grpc.ssl_channel_credentials(ca.cert_pem)  # a client: the CA only
            async with grpc.aio.secure_channel(f"localhost:{address.rsplit(':', 1)[1]}", credentials) as channel:
                echo = await channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=3)
            async with grpc.aio.secure_channel(address, credentials) as channel:  # 127.0.0.1: an IP SAN
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return echo.decode(), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        finally:
            await host.__aexit__(None, None, None)

    assert asyncio.run(scenario()) == ("x", "SERVING")


def test_roles_of_certificate_names():
    assert role_of("scheduler.tunemesh") == "scheduler"
    assert role_of("t1.trainer.tunemesh") == "trainer"
    assert role_of("*.sampler.tunemesh") == "sampler"
    assert role_of("trainer.tunemesh") is None  # a node role needs a node
    assert role_of("t1.scheduler.tunemesh") is None
    assert role_of("scheduler.example.com") is None
    assert role_of("localhost") is None
    policy = PeerPolicy("trainer", {"scheduler"})
    assert policy.allowed("/a.B/C") == frozenset({"scheduler"})
    with pytest.raises(ValueError, match="DNS label"):
        identity_name("trainer", "Bad_Node")


def test_services_refuse_to_start_without_tls_or_insecure(tmp_path: Path):
    from tunemesh_checkpoint.settings import CheckpointSettings
    from tunemesh_common.service import settings

    bare = settings.load(CheckpointSettings, [])
    with pytest.raises(SystemExit, match="no TLS material.*--insecure true"):
        bare.mesh_tls()
    assert settings.load(CheckpointSettings, ["--insecure", "true"]).mesh_tls() is None
    missing = settings.load(CheckpointSettings, ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert",
                                                 str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")])
    with pytest.raises(SystemExit, match="cannot read the TLS CA bundle"):
        missing.mesh_tls()
