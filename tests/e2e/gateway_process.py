"""The Tinker gateway as a process in front of a real mesh, for the e2e suites that drive it
with Tinker-side code (the SDK, the cookbook's recipes): `Gateway`, and the session's one
tiny-dense mesh with a gateway before it (`gateway_mesh`, `gateway`; registered for
tests/e2e by its conftest.py, so every module shares them)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

MODEL = "tunemesh/tiny-dense"  # 512-token context


class Gateway:
    """`python -m tunemesh_gateway` as a process on a loopback port (kept across restarts)."""

    def __init__(self, mesh, state: pathlib.Path) -> None:
        self.mesh, self.state, self.port, self.process = mesh, state, 0, None
        self.log_path = state / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = self.state / "ready.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        tls = ["--ca-bundle", self.mesh.ca_file] if self.mesh.ca_file else ["--insecure", "true"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunemesh_gateway", "--listen", f"127.0.0.1:{self.port}",
                 "--scheduler", self.mesh.scheduler_address, *tls, "--ready-file", str(ready)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the gateway did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.port = int(json.loads(ready.read_text())["address"].rpartition(":")[2])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text()[-chars:]


@pytest.fixture(scope="session")
def gateway_mesh(start_mesh, tmp_path_factory: pytest.TempPathFactory):
    """A tiny-dense mesh with one torch sampler, for the gateway's suites (one per session)."""
    with start_mesh(tmp_path_factory.mktemp("gateway-mesh"), samplers=1) as running:
        yield running


@pytest.fixture(scope="session")
def gateway(gateway_mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway before `gateway_mesh` (one per session; a test may restart it, same port)."""
    running = Gateway(gateway_mesh, tmp_path_factory.mktemp("gateway"))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        print(running.log_tail())  # shown when a test failed
