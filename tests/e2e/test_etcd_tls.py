"""etcd over mutual TLS with the mesh's users and roles (`etcd_auth`), against a real etcd:
who may write what, and who cannot connect at all."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path

import aetcd
import grpc
import pytest

from tunemesh_common.membership import etcd_auth, registry
from tunemesh_common.membership.etcd_process import EtcdProcess, EtcdTlsFiles, is_healthy
from tunemesh_common.membership.registry import NodeRegistration, NodeWatcher
from tunemesh_common.security.pki import Authority
from tunemesh_common.security.tls import MeshTls, etcd_user, identity_name

pytestmark = pytest.mark.e2e
TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class TlsEtcd:
    process: EtcdProcess
    ca: Authority
    dir: Path

    @property
    def endpoint(self) -> str:
        return self.process.endpoint

    def tls(self, role: str, node_id: str = "", ca: Authority | None = None) -> MeshTls:
        issued = (ca or self.ca).issue(etcd_user(role), [identity_name(role, node_id)])
        return MeshTls(self.ca.cert_pem, issued.cert_pem, issued.key_pem)

    def client(self, role: str, node_id: str = "") -> aetcd.Client:
        return registry.connect(self.endpoint, TIMEOUT_S, tls=self.tls(role, node_id))


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    """An etcd with TLS whose auth `enable_auth` set up, twice (the second run is a no-op)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    root = tmp_path_factory.mktemp("etcd-tls")
    ca = Authority.create()
    ca.write(root)
    cert, key = ca.issue("etcd", ["etcd.tunemesh", "localhost"], ["127.0.0.1"]).write(root, "etcd")
    process = EtcdProcess(root / "data", log_path=root / "etcd.log", tls=EtcdTlsFiles(root / "ca.pem", cert, key))
    process.start()
    etcd = TlsEtcd(process, ca, root)
    try:
        admin = etcd.tls("admin")
        asyncio.run(asyncio.wait_for(etcd_auth.enable_auth(etcd.endpoint, admin), 20))
        asyncio.run(asyncio.wait_for(etcd_auth.enable_auth(etcd.endpoint, admin), 20))
        yield etcd
    finally:
        process.stop()


async def _refusal(call: Awaitable) -> grpc.StatusCode:
    """The status code etcd refused `call` with (aetcd raises a bare ClientError for
    PERMISSION_DENIED, the gRPC error as its cause)."""
    with pytest.raises(aetcd.ClientError) as caught:
        await call
    return caught.value.__cause__.code()


def test_health_is_plaintext_on_the_metrics_port_only(etcd: TlsEtcd) -> None:
    assert is_healthy(etcd.process.health_endpoint)
    assert not is_healthy(etcd.endpoint)  # https, and it wants a client certificate


def test_the_scheduler_reads_and_writes_all_of_the_mesh(etcd: TlsEtcd) -> None:
    async def scenario() -> None:
        async with etcd.client("scheduler") as client, etcd.client("trainer", "t9") as trainer:
            await client.put(registry.run_key("r1"), b"meta")
            assert (await client.get(registry.run_key("r1"))).value == b"meta"
            table = registry.PlacementTable(client)
            assert await table.place_run("r1", "t9")
            watcher = await NodeWatcher.start(client, "trainers")
            node = await NodeRegistration.start(trainer, "trainers", "t9", b"rec", ttl=2)
            await watcher.wait_for(lambda nodes: nodes.get("t9") == b"rec", timeout=5)
            await client.put(registry.node_key("samplers", "s9"), b"by scheduler")
            assert (await client.get(registry.node_key("samplers", "s9"))).value == b"by scheduler"
            await node.stop()
            await watcher.wait_for(lambda nodes: "t9" not in nodes, timeout=5)
            await watcher.stop()

    asyncio.run(scenario())


def test_a_trainer_writes_its_record_and_nothing_else(etcd: TlsEtcd) -> None:
    async def scenario() -> None:
        async with etcd.client("trainer", "t1") as client:
            node = await NodeRegistration.start(client, "trainers", "t1", b"v", ttl=2)
            assert (await client.get(registry.node_key("trainers", "t1"))).value == b"v"
            await node.update(b"v2")
            denied = grpc.StatusCode.PERMISSION_DENIED
            assert await _refusal(client.put(registry.node_key("samplers", "s1"), b"x")) == denied
            assert await _refusal(client.put(registry.run_key("r1"), b"x")) == denied
            assert await _refusal(client.put(registry.placement_key("r1"), b"t1")) == denied
            assert await _refusal(client.get(registry.run_key("r1"))) == denied
            await node.stop()
            assert await client.get(registry.node_key("trainers", "t1")) is None
        async with etcd.client("sampler", "s1") as client:
            assert await _refusal(client.put(registry.node_key("trainers", "t1"), b"x")) == denied
            await client.put(registry.node_key("samplers", "s1"), b"s")
        async with etcd.client("checkpoint") as client:
            assert await _refusal(client.get(registry.node_key("samplers", "s1"))) == denied

    asyncio.run(scenario())


def test_the_gateway_keeps_its_tables_and_reads_nothing_else(etcd: TlsEtcd) -> None:
    """tunemesh-gateway: readwrite on /tunemesh/gateway/ (its EtcdStore) only."""
    from tunemesh_gateway.etcd_store import EtcdStore

    async def scenario() -> None:
        async with etcd.client("scheduler") as scheduler:
            await scheduler.put(registry.run_key("r7"), b"meta")
        async with etcd.client("gateway") as client:
            store = EtcdStore(client)
            await store.put_model("s:train:0", "runs/r7")
            assert await store.run_of("s:train:0") == "runs/r7"
            denied = grpc.StatusCode.PERMISSION_DENIED
            assert await _refusal(client.get(registry.run_key("r7"))) == denied
            assert await _refusal(client.put(registry.placement_key("r7"), b"t1")) == denied
            assert await _refusal(client.put(registry.node_key("trainers", "t1"), b"x")) == denied
            assert await _refusal(client.get_prefix(f"{registry.ROOT}/".encode())) == denied
        async with etcd.client("trainer", "t1") as trainer:
            assert await _refusal(trainer.get(f"{registry.ROOT}/gateway/models/s:train:0".encode())) == denied

    asyncio.run(scenario())


def test_a_certificate_of_another_ca_or_no_tls_cannot_connect(etcd: TlsEtcd) -> None:
    async def scenario() -> None:
        stranger = etcd.tls("scheduler", ca=Authority.create("another CA"))
        async with registry.connect(etcd.endpoint, TIMEOUT_S, tls=stranger) as client:
            with pytest.raises(aetcd.ConnectionFailedError):
                await client.get(registry.run_key("r1"))
        async with registry.connect(etcd.endpoint, TIMEOUT_S) as client:
            with pytest.raises(aetcd.ConnectionFailedError):
                await client.get(registry.run_key("r1"))

    asyncio.run(scenario())


def _cli(etcd: TlsEtcd, admin: MeshTls, name: str) -> subprocess.CompletedProcess:
    (etcd.dir / f"{name}.pem").write_bytes(admin.cert_pem)
    (etcd.dir / f"{name}-key.pem").write_bytes(admin.key_pem)
    argv = [sys.executable, "-m", "tunemesh_common.membership.etcd_auth", "--endpoint", etcd.endpoint,
            "--tls-ca", str(etcd.dir / "ca.pem"), "--tls-cert", str(etcd.dir / f"{name}.pem"),
            "--tls-key", str(etcd.dir / f"{name}-key.pem"), "--wait-s", "0"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_the_command_reruns_cleanly_and_fails_in_one_line(etcd: TlsEtcd) -> None:
    done = _cli(etcd, etcd.tls("admin"), "admin")
    assert done.returncode == 0, done.stderr
    failed = _cli(etcd, etcd.tls("admin", ca=Authority.create("another CA")), "stranger")
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1
    assert last.startswith("python -m tunemesh_common.membership.etcd_auth: error: UNAVAILABLE"), failed.stderr


def test_auth_survives_a_restart_in_place(etcd: TlsEtcd) -> None:
    async def write() -> None:
        async with etcd.client("scheduler") as client:
            await client.put(registry.run_key("kept"), b"meta")

    async def check() -> None:
        async with etcd.client("trainer", "t1") as client:
            assert await _refusal(client.get(registry.run_key("kept"))) == grpc.StatusCode.PERMISSION_DENIED
        async with etcd.client("scheduler") as client:
            assert (await client.get(registry.run_key("kept"))).value == b"meta"

    asyncio.run(write())
    etcd.process.kill()
    etcd.process.start()
    asyncio.run(check())
