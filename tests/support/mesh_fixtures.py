"""Fixtures for suites that start whole meshes (tests/e2e, tests/fault): `start_mesh` and
the session's shared model cache. Registered for every suite by tests/conftest.py."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tunemesh_local.state import MeshState


@pytest.fixture(scope="session")
def model_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model cache shared by every mesh of the session, so tiny models are built once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def mesh_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mesh CA for every mesh of the session (each mesh issues its own certificates
    from it), so the `TUNEMESH_CA_BUNDLE` that `start_mesh` sets while a mesh runs fits
    every mesh and every client process the tests start."""
    from tunemesh_local.certs import MeshCerts

    ca_dir = tmp_path_factory.mktemp("mesh-ca")
    MeshCerts(ca_dir)
    return ca_dir


@pytest.fixture(scope="session")
def start_mesh(model_data_dir: Path, mesh_ca_dir: Path) -> Callable[..., AbstractContextManager]:
    """`with start_mesh(state_dir, trainers=1, models=(...), env={...}, samplers=0) as mesh:` a running
    mesh (`tunemesh_local.state.MeshState`), stopped on exit. `env` is set for the children
    only (TUNEMESH_SCHEDULER_* / TUNEMESH_TRAINER_* settings); trainers share the
    session's model cache. Its schedulers accept the plain-text DEV_KEYS (tml-demo-alice,
    tml-demo-bob) besides the mesh's fresh keys. `prometheus=True` also starts a Prometheus (`mesh.prometheus_url`);
    `gateway=True` the launcher's Tinker gateway (`mesh.gateway_url`; off by default here, unlike `tunemesh up`).
    `dev_keys=False` leaves DEV_KEYS out: only the fresh keys (`launcher.client_keys(mesh)`), as `tunemesh up`.
    Every hop runs TLS with certificates of the session's CA (`mesh_ca_dir`);
    `insecure=True` starts a plaintext mesh instead."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd binary not installed (Debian: etcd-server)")

    @contextlib.contextmanager
    def start(state_dir: Path, trainers: int = 1, models: tuple[str, ...] = ("tunemesh/tiny-dense",),
              env: dict[str, str] | None = None, samplers: int = 0, sampler_engine: str = "torch",
              prometheus: bool = False, schedulers: int = 1, insecure: bool = False,
              gateway: bool = False, dev_keys: bool = True) -> Iterator[MeshState]:
        from tunemesh_local import launcher

        def services(config, etcd_endpoint, api_keys_file):
            return [_with_data_dir(spec, model_data_dir) for spec in
                    launcher.default_services(config, etcd_endpoint, api_keys_file)]

        config = launcher.MeshConfig(state_dir=Path(state_dir), trainers=trainers, models=tuple(models),
                                     ready_timeout=120.0, samplers=samplers, sampler_engine=sampler_engine,
                                     prometheus=prometheus, schedulers=schedulers, insecure_dev_keys=DEV_KEYS if dev_keys else None,
                                     insecure=insecure, ca_dir=mesh_ca_dir, gateway=gateway)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**MESH_ENV, **(env or {})}.items():
                patch.setenv(name, value)
            mesh = launcher.up(config, services)
        try:
            with pytest.MonkeyPatch.context() as patch:  # clients trust the mesh CA while it runs
                if mesh.ca_file:
                    patch.setenv("TUNEMESH_CA_BUNDLE", mesh.ca_file)
                yield mesh
        finally:
            launcher.down(Path(mesh.state_dir), grace=5.0)

    return start


# Plain-text keys the tests' meshes also accept (the explicit development path, besides the
# fresh hashed keys `tunemesh up` makes: `launcher.client_keys(mesh)`).
DEV_KEYS = {"tml-demo-alice": "alice", "tml-demo-bob": "bob"}
MESH_ENV = {"HF_HUB_OFFLINE": "1", "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def _with_data_dir(spec, data_dir: Path):
    """A trainer spec whose `--data-dir` is `data_dir` (other specs unchanged)."""
    argv = list(spec.argv)
    if "--data-dir" in argv:
        argv[argv.index("--data-dir") + 1] = str(data_dir)
    return dataclasses.replace(spec, argv=tuple(argv))
