"""Gateway settings: flags, else `TUNEMESH_GATEWAY_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from tunemesh_common.security.tls import MeshTls
from tunemesh_common.service import settings
from tunemesh_common.service.settings import HostPort, HostPortOrEmpty


class GatewaySettings(BaseSettings):
    """Tinker's HTTP protocol in front of the scheduler (`python -m tunemesh_gateway`).

    The gateway is a client of the scheduler's public port (server TLS, API keys): it needs
    the mesh CA to check the scheduler. Its own certificate (`gateway.tunemesh`, etcd user
    tunemesh-gateway; `tunemesh up` issues one) serves HTTPS to Tinker clients
    (--tls-cert) and proves it to etcd (--etcd-tls-cert); the two may be the same files."""

    model_config = settings.settings_config("gateway")

    listen: HostPort = Field("127.0.0.1:0", description="host:port of the HTTP server; port 0 picks a free one")
    scheduler: str = Field("127.0.0.1:50051", min_length=1, description=(
        "host:port of the scheduler's public API, or a comma-separated list of its replicas"))
    ca_bundle: pathlib.Path | None = Field(None, description=(
        "PEM bundle of the CA the scheduler's certificate is checked against (the mesh CA, "
        "`tunemesh up` prints it); unset: the system roots"))
    insecure: bool = Field(False, description=(
        "plaintext to the scheduler and etcd (a mesh run with --insecure; development)"))
    api_keys_file: pathlib.Path | None = Field(None, description=(
        "the mesh's API keys file (the scheduler's --api-keys-file, read-only): keys are verified here "
        "before any call carries them, so the scheduler never sees guesses from the gateway's address; "
        "unset: failed keys are only tallied per client (see key_guard.py)"))
    api_keys_check_s: float = Field(2.0, gt=0, description="how often the API keys file is checked for changes")
    max_client_failures: int = Field(4, ge=1, description=(
        "failed API keys a client address may send per minute before it waits a minute (429); keep it "
        "under the scheduler's --auth-max-failures (10), which counts the gateway's address as one"))
    etcd: HostPortOrEmpty = Field("", description=(
        "host:port of the mesh's etcd, where the gateway keeps its tables (model ids, sampling sessions) "
        "across restarts and replicas; empty: in memory, lost on restart"))
    etcd_tls_cert: pathlib.Path | None = Field(None, description=(
        "PEM certificate (of the --ca-bundle CA) the gateway proves to etcd; its common name is the etcd user"))
    etcd_tls_key: pathlib.Path | None = Field(None, description="PEM private key of --etcd-tls-cert")
    tls_cert: pathlib.Path | None = Field(None, description=(
        "PEM certificate the HTTP listener serves (HTTPS), naming the hosts clients dial; unset: plain HTTP "
        "(development, or behind a proxy that terminates TLS)"))
    tls_key: pathlib.Path | None = Field(None, description="PEM private key of --tls-cert")
    metrics_listen: HostPortOrEmpty = Field("", description=(
        "host:port of a plaintext /metrics, /healthz (the process runs) and /readyz (the scheduler answers) "
        "endpoint, as every service has, for Prometheus and probes; port 0 picks one; empty: none "
        "(/metrics and /healthz are on the HTTP listener either way)"))
    ready_file: pathlib.Path | None = Field(None, description=(
        'written once serving: {"address", "url", "pid", "metrics_url"} (for launchers)'))
    poll_wait_s: float = Field(25.0, gt=0, le=40, description=(
        "longest hold of one retrieve_future long-poll, in seconds (the SDK reads for 45 s)"))
    call_timeout_s: float = Field(30.0, gt=0, description=(
        "deadline of one plain call to the scheduler, in seconds (below the SDK's 60 s HTTP timeout)"))
    sample_timeout_s: float = Field(900.0, gt=0, description="deadline of one Sample call, in seconds")
    create_timeout_s: float = Field(900.0, gt=0, description="deadline of one CreateTrainingRun call, in seconds")
    max_samples_per_call: int = Field(16, ge=1, description=(
        "sequences per Sample call (the scheduler's max_samples): a larger num_samples is split"))
    max_inflight_samples: int = Field(512, ge=1, description=(
        "asample requests in flight at once; more answer 429 and the SDK backs off"))
    result_ttl_s: float = Field(600.0, gt=0, description=(
        "how long a finished sample or create result waits to be fetched, in seconds"))
    unnamed_sampler_ttl_s: int = Field(86400, ge=0, description=(
        "TTL of the checkpoint an unnamed save_weights_for_sampler writes (Tinker calls them ephemeral), "
        "in seconds; 0: never expires"))
    fwdbwd_max_chunk_bytes: int = Field(4_000_000, ge=1024, description=(
        "client/config's fwdbwd_max_chunk_bytes_count cap: the SDK splits forward_backward calls by it"))

    @field_validator("ca_bundle", "etcd_tls_cert", "etcd_tls_key", "tls_cert", "tls_key", "ready_file", mode="after")
    @classmethod
    def _expand_user(cls, value: Any) -> Any:
        return value.expanduser() if isinstance(value, pathlib.Path) else value


def etcd_tls(s: GatewaySettings) -> MeshTls | None:
    """The gateway's TLS material for etcd, None for plaintext (--insecure); SystemExit
    saying what is missing."""
    files = (s.ca_bundle, s.etcd_tls_cert, s.etcd_tls_key)
    if s.insecure:
        return None
    if not all(files):
        raise SystemExit("python -m tunemesh_gateway: --etcd needs --ca-bundle, --etcd-tls-cert and --etcd-tls-key "
                         "(or --insecure true)")
    try:
        return MeshTls.from_files(*files)
    except ValueError as err:
        raise SystemExit(f"python -m tunemesh_gateway: {err}") from None


def listener_tls(s: GatewaySettings) -> tuple[pathlib.Path, pathlib.Path] | None:
    """The certificate and key the HTTP listener serves (checked readable PEM), None for
    plain HTTP; SystemExit saying what is wrong."""
    if s.tls_cert is None and s.tls_key is None:
        return None
    if s.tls_cert is None or s.tls_key is None:
        raise SystemExit("python -m tunemesh_gateway: --tls-cert and --tls-key go together")
    for what, path, marker in (("certificate", s.tls_cert, b"CERTIFICATE"), ("key", s.tls_key, b"PRIVATE KEY")):
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SystemExit(f"python -m tunemesh_gateway: cannot read the TLS {what} {path}: {err.strerror}") from None
        if b"-----BEGIN" not in data or marker not in data:
            raise SystemExit(f"python -m tunemesh_gateway: the TLS {what} {path} is not PEM")
    return s.tls_cert, s.tls_key


def load(argv: list[str] | None = None) -> GatewaySettings:
    return settings.load(GatewaySettings, argv)  # type: ignore[type-var]  (a BaseSettings like the services')
