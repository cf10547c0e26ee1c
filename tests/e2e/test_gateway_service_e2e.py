"""The Tinker gateway as a service of the mesh (the launcher's own, as `tunemesh up` starts
it; not a process the test starts): HTTPS with its certificate of the mesh CA, which the
unmodified tinker SDK trusts through SSL_CERT_FILE; /healthz, its metrics endpoint scraped
by the mesh's Prometheus; its tables in etcd as user tunemesh-gateway, so a model id stays
usable across a restart of the gateway process (`launcher.restart`)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from tunemesh_common.membership import registry  # noqa: E402
from tunemesh_local import cli, launcher, processes, prometheus  # noqa: E402
from tunemesh_local.status import admin_tls  # noqa: E402

pytestmark = pytest.mark.e2e

MODEL = "tunemesh/tiny-dense"
KEY = "tml-demo-alice"
TOKENS = [5, 6, 7, 8, 60, 61, 62, 63]
TIMEOUT = 120
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory):
    """A tiny-dense mesh (no sampler, a leader and a standby scheduler: the gateway is told
    both) with the launcher's gateway and a Prometheus."""
    with start_mesh(tmp_path_factory.mktemp("gateway-service"), gateway=True, prometheus=True,
                    schedulers=2) as running:
        yield running


def gateway_record(mesh):
    [record] = mesh.by_role("gateway")
    return record


def wait_healthy(url: str, ca_file: str, timeout: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        reply = httpx.get(f"{url}/healthz", verify=ssl.create_default_context(cafile=ca_file), trust_env=False)
        if reply.status_code == 200 or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def gateway_tables(mesh) -> dict[str, str]:
    """/tunemesh/gateway/models/* in etcd (read as etcd's root: the mesh's admin certificate)."""
    async def read() -> dict[str, str]:
        async with registry.connect(mesh.etcd_endpoint, tls=admin_tls(mesh)) as client:
            rows = await client.get_prefix(f"{registry.ROOT}/gateway/models/".encode())
        return {kv.key.decode().rpartition("/")[2]: kv.value.decode() for kv in rows}

    return asyncio.run(read())


def test_the_gateway_serves_https_of_the_mesh_ca_with_health_and_metrics(mesh, capsys):
    record = gateway_record(mesh)
    assert mesh.gateway_url == f"https://{record.address}" and record.address.startswith("127.0.0.1:")
    assert wait_healthy(mesh.gateway_url, mesh.ca_file).json() == {"status": "ok"}
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # the default roots do not know it
        httpx.get(f"{mesh.gateway_url}/healthz", trust_env=False)
    with _NO_PROXY.open(record.metrics_url.replace("/metrics", "/readyz"), timeout=5) as reply:
        assert reply.status == 200  # the plaintext metrics endpoint every service has
    with _NO_PROXY.open(record.metrics_url, timeout=5) as reply:
        assert b"tunemesh_gateway_request_duration_seconds" in reply.read()
    assert cli.main(["status", "--json", "--state-dir", mesh.state_dir]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["gateway_url"] == mesh.gateway_url
    assert [p["alive"] for p in view["processes"] if p["role"] == "gateway"] == [True]
    deadline = time.monotonic() + 30
    while not prometheus.query(mesh.prometheus_url, 'up{job="gateway",node="gateway"} == 1'):
        assert time.monotonic() < deadline, "Prometheus never scraped the gateway"
        time.sleep(0.5)


def datum() -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                       loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)})


def train_step(trainer) -> float:
    result = trainer.forward_backward([datum()], "cross_entropy")
    step = trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    loss = result.result(timeout=TIMEOUT).metrics["loss:sum"]
    step.result(timeout=TIMEOUT)
    return loss


def test_the_tinker_sdk_trains_through_it_and_a_restart_keeps_the_model_id(mesh, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", mesh.ca_file)  # how httpx, the SDK's client, takes the mesh CA
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    service = tinker.ServiceClient(base_url=mesh.gateway_url, api_key=KEY)
    try:
        rest = tinker.RestClient(base_url=mesh.gateway_url, api_key=KEY)  # the SDK's way to capabilities
        supported = [m.model_name for m in rest.get_server_capabilities().result(timeout=TIMEOUT).supported_models]
        assert MODEL in supported
        trainer = service.create_lora_training_client(base_model=MODEL, rank=8, seed=3).result(timeout=TIMEOUT)
        first = train_step(trainer)
        assert np.isfinite(first) and first > 0
        tables = gateway_tables(mesh)
        assert tables.get(trainer.model_id, "").startswith("runs/")  # written as tunemesh-gateway

        record = gateway_record(mesh)
        old_pid = record.pid
        processes.terminate([(record.pid, record.start_time)], grace=5.0)
        restarted = launcher.restart(Path(mesh.state_dir), "gateway", timeout=60)
        assert restarted.pid != old_pid and restarted.address == record.address  # clients keep their URL
        assert wait_healthy(mesh.gateway_url, mesh.ca_file).status_code == 200

        assert train_step(trainer) < first  # the same client, the same model id, one more step
        info = rest.get_training_run(trainer.model_id).result(timeout=TIMEOUT)
        assert info.base_model == MODEL
        assert gateway_tables(mesh)[trainer.model_id] == tables[trainer.model_id]
        log = Path(restarted.log_path).read_text()
        assert log.count(f"tables in etcd {mesh.etcd_endpoint}") == 2  # both lives kept them there
    finally:
        service.close("success").result(timeout=TIMEOUT)
