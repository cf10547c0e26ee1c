"""Shared e2e fixtures: a real single-member etcd on free loopback ports; an observed mesh
(`start_mesh` and `model_data_dir` come from tests/support/mesh_fixtures.py, for every suite);
the session's tiny-dense mesh with a Tinker gateway before it (`gateway_process`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import mesh_traffic
import pytest
from gateway_process import gateway, gateway_mesh  # noqa: F401  (fixtures for the gateway's suites)

from tunemesh_common.membership.etcd_process import EtcdProcess


@pytest.fixture
def etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """A started etcd in its own tmp data dir; `.kill()` / `.start()` restart it on the same ports."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")
    root = tmp_path_factory.mktemp("etcd")
    etcd = EtcdProcess(root / "data", log_path=root / "etcd.log")
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture
def etcd_endpoint(etcd_process: EtcdProcess) -> str:
    """`127.0.0.1:PORT` of a fresh etcd, stopped after the test."""
    return etcd_process.endpoint


@pytest.fixture(scope="session")
def observed_mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[mesh_traffic.ObservedMesh]:
    """A tiny-dense mesh (checkpoint, trainer, torch sampler, scheduler) with a Prometheus,
    after two rounds of: two tenants trained, saved weights, sampled, scored and hit a
    NOT_FOUND (`mesh_traffic.drive`), each followed by two scrapes of every target (so
    rates see increases): `.prometheus_url`, `.mesh`, `.steps`, `.rounds`. One per session."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus binary not installed (Debian: prometheus)")
    with start_mesh(tmp_path_factory.mktemp("observed"), samplers=1, prometheus=True) as mesh:
        for done in range(1, mesh_traffic.ROUNDS + 1):
            mesh_traffic.drive(mesh.scheduler_address)
            mesh_traffic.wait_for_scrapes(mesh.prometheus_url, rounds=done)
        yield mesh_traffic.ObservedMesh(mesh, mesh.prometheus_url, mesh_traffic.STEPS, mesh_traffic.ROUNDS)
