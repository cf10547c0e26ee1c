"""A single-member etcd on loopback: command line, health wait, and a managed process.

Used by `tunemesh up` (detached etcd for a local mesh) and by the e2e test fixture.

Plaintext by default. With `EtcdTlsFiles` the client listener is https and requires a
client certificate of the mesh CA (etcd takes its common name as the user, see
`etcd_auth`), and a plaintext metrics listener serves `/health` and `/metrics` only (no
keys, no writes), so health checks need no certificate: `is_healthy`/`wait_healthy` are
then pointed at the metrics endpoint (`health_endpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tunemesh.errors import FailedPreconditionError, UnavailableError

logger = logging.getLogger(__name__)

ETCD_BINARY = "etcd"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pick_free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free on `host` a moment ago (bind to 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class EtcdTlsFiles:
    """etcd's server TLS files (PEM): the CA whose client certificates it accepts, and its
    own certificate (naming `etcd.tunemesh`, which clients verify) and key."""

    ca: Path
    cert: Path
    key: Path


def etcd_argv(data_dir: Path, client_port: int, peer_port: int, name: str = "tunemesh",
              tls: EtcdTlsFiles | None = None, metrics_port: int | None = None) -> list[str]:
    """Command line of a one-member etcd listening on 127.0.0.1 only.

    With `tls`, the client listener is https with mutual TLS and `metrics_port` (then
    required) gets a plaintext listener serving /health and /metrics only."""
    if tls is not None and metrics_port is None:
        raise ValueError("an etcd with TLS needs a metrics_port: its plaintext /health is checked there")
    client_url = f"{'https' if tls else 'http'}://127.0.0.1:{client_port}"
    # Peer traffic stays plaintext: a one-member cluster has no peers, and this listener is
    # on loopback only. A multi-member etcd would need --peer-cert-file and friends.
    peer_url = f"http://127.0.0.1:{peer_port}"
    argv = [
        ETCD_BINARY,
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{name}={peer_url}",
        "--initial-cluster-state", "new",
        # The scheduler journals every operation: keep 5 minutes of history, not all of it.
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
    ]
    if tls is not None:
        argv += ["--cert-file", str(tls.cert), "--key-file", str(tls.key),
                 "--trusted-ca-file", str(tls.ca), "--client-cert-auth"]
    if metrics_port is not None:
        argv += ["--listen-metrics-urls", f"http://127.0.0.1:{metrics_port}"]
    return argv


def health_endpoint(argv: list[str]) -> str:
    """`host:port` serving plaintext /health for the etcd started with `argv`: its metrics
    listener when it has one, else its client listener (an https-only etcd without a
    metrics listener has none: ValueError)."""
    for flag in ("--listen-metrics-urls", "--listen-client-urls"):
        if flag in argv:
            url = argv[argv.index(flag) + 1].split(",")[0]
            if url.startswith("http://"):
                return url.removeprefix("http://")
    raise ValueError("this etcd serves no plaintext /health (give it a metrics listener)")


def is_healthy(endpoint: str, timeout: float = 1.0) -> bool:
    """True when etcd at `host:port` answers its plaintext /health endpoint with
    health=true: the client endpoint of a plaintext etcd, the metrics endpoint of one with
    TLS (`health_endpoint`)."""
    try:
        with _NO_PROXY.open(f"http://{endpoint}/health", timeout=timeout) as response:
            return json.loads(response.read()).get("health") == "true"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_healthy(endpoint: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until etcd is healthy at `endpoint` (as `is_healthy`); raise UnavailableError
    on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UnavailableError("ETCD_EXITED", f"etcd exited with code {proc.returncode}")
        if is_healthy(endpoint, timeout=0.5):
            return
        time.sleep(0.05)
    raise UnavailableError("ETCD_NOT_HEALTHY", f"etcd at {endpoint} not healthy after {timeout:.0f}s")


PORT_ATTEMPTS = 3  # first starts: a picked free port can be taken before etcd binds it


class EtcdProcess:
    """An etcd child process with fixed ports, so it can be killed and restarted in place.
    With `tls`, clients need a certificate of its CA; health is checked on a plaintext
    metrics port (also fixed)."""

    def __init__(self, data_dir: Path, log_path: Path | None = None, tls: EtcdTlsFiles | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / "etcd.log"
        self.tls = tls
        self.client_port = pick_free_port()
        self.peer_port = pick_free_port()
        self.metrics_port = pick_free_port() if tls else None
        self._proc: subprocess.Popen | None = None
        self._started = False  # once up, restarts keep its ports (clients know them)

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT` of the client listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def health_endpoint(self) -> str:
        """`127.0.0.1:PORT` serving plaintext /health: the metrics listener with TLS, else
        the client listener."""
        return f"127.0.0.1:{self.metrics_port}" if self.metrics_port else self.endpoint

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 15.0) -> None:
        """Start etcd (reusing the data dir if present) and wait until it is healthy. The
        first start takes fresh ports if another process took a picked one meanwhile."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(timeout)
            except UnavailableError:
                if self._started or attempt + 1 == PORT_ATTEMPTS or not self._lost_a_port():
                    raise
                logger.warning("etcd's port was taken before it bound it; trying fresh ports")
                self.client_port, self.peer_port = pick_free_port(), pick_free_port()
                self.metrics_port = pick_free_port() if self.tls else None
                continue
            self._started = True
            return

    def _lost_a_port(self) -> bool:
        try:
            return "address already in use" in self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return False

    def _start(self, timeout: float) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise FailedPreconditionError("ETCD_RUNNING", f"etcd already running (pid {self._proc.pid})")
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = etcd_argv(self.data_dir, self.client_port, self.peer_port, tls=self.tls,
                         metrics_port=self.metrics_port)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_healthy(self.health_endpoint, timeout, self._proc)
        except UnavailableError:
            self.stop()
            raise
        logger.info("etcd up at %s (pid %d)", self.endpoint, self._proc.pid)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
