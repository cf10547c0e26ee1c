"""The SDK's TLS to the mesh's public endpoint, against a grpc.aio SessionService on loopback
serving a certificate of a throwaway CA (as `tunemesh up` makes one): trusted CA bundles as a
path, as bytes and from $TUNEMESH_CA_BUNDLE; a wrong CA and a plaintext client refused; bad
bundles refused at construction; lists of replicas checked against their first host."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
from tunemesh_common.security import pki

import tunemesh
from tunemesh.loop import LoopThread
from tunemesh.v1 import sessions_pb2, sessions_pb2_grpc

API_KEY = "tml-test-key"
MODEL = "tiny-dense"
FAST = tunemesh.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=3.0, attempt_timeout_s=2.0)
FAIL_FAST = tunemesh.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, total_timeout_s=0.5,
                                 attempt_timeout_s=0.5)


class Sessions(sessions_pb2_grpc.SessionServiceServicer):
    """GetCapabilities only; records each call's authorization metadata."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.authorizations: list[str | None] = []

    async def GetCapabilities(self, request, context):
        with self.lock:
            self.authorizations.append(dict(context.invocation_metadata()).get("authorization"))
        model = sessions_pb2.SupportedModel(name=MODEL, family="dense", vocab_size=1024, max_seq_len=512)
        return sessions_pb2.GetCapabilitiesResponse(models=[model])

    def calls(self) -> int:
        with self.lock:
            return len(self.authorizations)


class TlsServers:
    """Two TLS SessionService replicas on 127.0.0.1 sharing one scheduler certificate."""

    def __init__(self, issued: pki.Issued, replicas: int = 2) -> None:
        self.loop = LoopThread("tls-test-server")
        self.sessions = Sessions()
        credentials = grpc.ssl_server_credentials([(issued.key_pem, issued.cert_pem)])

        async def start() -> tuple[list[grpc.aio.Server], list[int]]:
            servers, ports = [], []
            for _ in range(replicas):
                server = grpc.aio.server()
                sessions_pb2_grpc.add_SessionServiceServicer_to_server(self.sessions, server)
                ports.append(server.add_secure_port("127.0.0.1:0", credentials))
                await server.start()
                servers.append(server)
            return servers, ports

        self.servers, self.ports = self.loop.run(start())

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                await server.stop(None)

        self.loop.run(stop())
        self.loop.close()


@pytest.fixture(scope="module")
def authority() -> pki.Authority:
    return pki.Authority.create()


@pytest.fixture(scope="module")
def servers(authority):
    issued = authority.issue("scheduler", ["scheduler.tunemesh", "localhost"], ["127.0.0.1"])
    servers = TlsServers(issued)
    yield servers
    servers.close()


@pytest.fixture
def ca_file(authority, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(authority.cert_pem)
    return path


@pytest.fixture(autouse=True)
def no_env_bundle(monkeypatch):
    monkeypatch.delenv("TUNEMESH_CA_BUNDLE", raising=False)


def capabilities_through(address: str, policy: tunemesh.RetryPolicy = FAST, **kwargs):
    with tunemesh.ServiceClient(address, API_KEY, retry_policy=policy, **kwargs) as client:
        return client.get_server_capabilities()


def assert_served_with_key(servers: TlsServers, before: int, response) -> None:
    assert [model.model_name for model in response.supported_models] == [MODEL]
    assert servers.sessions.calls() == before + 1
    assert servers.sessions.authorizations[-1] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("form", ["str", "path", "bytes"])
def test_ca_bundle_argument_connects_over_tls_and_sends_the_key(servers, ca_file, form):
    bundle = {"str": str(ca_file), "path": ca_file, "bytes": ca_file.read_bytes()}[form]
    before = servers.sessions.calls()
    response = capabilities_through(f"127.0.0.1:{servers.ports[0]}", ca_bundle=bundle)
    assert_served_with_key(servers, before, response)


def test_ca_bundle_from_the_environment(servers, ca_file, monkeypatch):
    monkeypatch.setenv("TUNEMESH_CA_BUNDLE", str(ca_file))
    before = servers.sessions.calls()
    response = capabilities_through(f"localhost:{servers.ports[0]}")
    assert_served_with_key(servers, before, response)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_replica_list_is_checked_against_its_first_host(servers, ca_file, host):
    # Resolved to an ipv4: target, the list has no host name of its own to verify.
    first, second = servers.ports
    before = servers.sessions.calls()
    response = capabilities_through(f"{host}:{first},{host}:{second}", ca_bundle=ca_file)
    assert_served_with_key(servers, before, response)


def test_replica_list_reaches_a_later_replica_over_tls(servers, ca_file):
    before = servers.sessions.calls()
    response = capabilities_through(f"localhost:{closed_port()},localhost:{servers.ports[1]}", ca_bundle=ca_file)
    assert_served_with_key(servers, before, response)


def test_bundle_of_another_ca_fails_the_handshake(servers, tmp_path):
    other = tmp_path / "other-ca.pem"
    other.write_bytes(pki.Authority.create("another CA").cert_pem)
    before = servers.sessions.calls()
    with pytest.raises(tunemesh.UnavailableError):
        capabilities_through(f"127.0.0.1:{servers.ports[0]}", FAIL_FAST, ca_bundle=other)
    assert servers.sessions.calls() == before


def test_system_roots_do_not_trust_the_mesh_ca(servers):
    before = servers.sessions.calls()
    with pytest.raises(tunemesh.UnavailableError):
        capabilities_through(f"127.0.0.1:{servers.ports[0]}", FAIL_FAST, tls=True)
    assert servers.sessions.calls() == before


@pytest.mark.parametrize("kwargs", [{}, {"tls": False}], ids=["default", "tls-false"])
def test_plaintext_client_cannot_call_a_tls_server(servers, ca_file, monkeypatch, kwargs):
    if kwargs:  # an explicit tls=False ignores the environment's bundle
        monkeypatch.setenv("TUNEMESH_CA_BUNDLE", str(ca_file))
    before = servers.sessions.calls()
    with pytest.raises(tunemesh.UnavailableError):
        capabilities_through(f"127.0.0.1:{servers.ports[0]}", FAIL_FAST, **kwargs)
    assert servers.sessions.calls() == before


def test_missing_bundle_raises_at_construction_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(ValueError, match="cannot read the CA bundle .*nowhere/ca.pem") as raised:
        tunemesh.ServiceClient("127.0.0.1:1", API_KEY, ca_bundle=missing)
    assert "TUNEMESH_CA_BUNDLE" not in str(raised.value)


def test_missing_bundle_from_the_environment_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEMESH_CA_BUNDLE", str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match=r"ca\.pem \(from \$TUNEMESH_CA_BUNDLE\)"):
        tunemesh.ServiceClient("127.0.0.1:1", API_KEY)


@pytest.mark.parametrize("bundle", ["file", b"not a certificate"], ids=["file", "bytes"])
def test_bundle_without_a_pem_certificate_raises_at_construction(tmp_path, bundle):
    if bundle == "file":
        bundle = tmp_path / "ca.pem"
        bundle.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="holds no PEM certificate"):
        tunemesh.ServiceClient("127.0.0.1:1", API_KEY, ca_bundle=bundle)


def test_plaintext_with_a_bundle_is_a_contradiction(ca_file):
    with pytest.raises(ValueError, match="tls=False"):
        tunemesh.ServiceClient("127.0.0.1:1", API_KEY, ca_bundle=ca_file, tls=False)


def test_tls_settings_do_not_apply_to_a_caller_supplied_channel(ca_file):
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        with pytest.raises(ValueError, match="caller-supplied"):
            tunemesh.ServiceClient(channel=channel, ca_bundle=ca_file)
    finally:
        channel.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
