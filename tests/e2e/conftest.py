"""Shared e2e fixtures: a real single-member etcd on free loopback ports; a whole mesh."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import mesh_traffic
import pytest

from tunemesh_common.etcd_process import EtcdProcess
from tunemesh_local.state import MeshState


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


# ---- a whole mesh (etcd + trainers + scheduler) as real processes -------------------------


@pytest.fixture(scope="session")
def model_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model cache shared by every mesh of the session, so tiny models are built once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def start_mesh(model_data_dir: Path) -> Callable[..., AbstractContextManager]:
    """`with start_mesh(state_dir, trainers=1, models=(...), env={...}, samplers=0) as mesh:` a running
    mesh (`tunemesh_local.state.MeshState`), stopped on exit. `env` is set for the children
    only (TUNEMESH_SCHEDULER_* / TUNEMESH_TRAINER_* settings); trainers share the
    session's model cache. `prometheus=True` also starts a Prometheus (`mesh.prometheus_url`)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")

    @contextlib.contextmanager
    def start(state_dir: Path, trainers: int = 1, models: tuple[str, ...] = ("tunemesh/tiny-dense",),
              env: dict[str, str] | None = None, samplers: int = 0, sampler_engine: str = "torch",
              prometheus: bool = False) -> Iterator[MeshState]:
        from tunemesh_local import launcher

        def services(config, etcd_endpoint, api_keys_file):
            return [_with_data_dir(spec, model_data_dir) for spec in
                    launcher.default_services(config, etcd_endpoint, api_keys_file)]

        config = launcher.MeshConfig(state_dir=Path(state_dir), trainers=trainers, models=tuple(models),
                                     ready_timeout=120.0, samplers=samplers, sampler_engine=sampler_engine,
                                     prometheus=prometheus)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**MESH_ENV, **(env or {})}.items():
                patch.setenv(name, value)
            mesh = launcher.up(config, services)
        try:
            yield mesh
        finally:
            launcher.down(Path(mesh.state_dir), grace=5.0)

    return start


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


MESH_ENV = {"HF_HUB_OFFLINE": "1", "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def _with_data_dir(spec, data_dir: Path):
    """A trainer spec whose `--data-dir` is `data_dir` (other specs unchanged)."""
    argv = list(spec.argv)
    if "--data-dir" in argv:
        argv[argv.index("--data-dir") + 1] = str(data_dir)
    return dataclasses.replace(spec, argv=tuple(argv))
