"""`tunemesh up` / `tunemesh down`: a whole mesh as background processes on loopback.

Layout of a state dir: `mesh.json` (state), `api_keys.json` (hashed API keys, one made per
tenant of a fresh state dir) and `client_keys.json` (those keys, for local clients; 0600),
`etcd/` (etcd data), `checkpoints/` (the checkpoint store, kept across restarts),
`logs/<name>.log`, `run/<name>.ready.json`, `trainers/<node-id>/`, `tls/` (the mesh CA and
each process's certificate; not with --insecure); with `--prometheus` also `prometheus.yml`
and `prometheus/` (its data, kept across restarts).

The Tinker gateway (`tunemesh_gateway`, unless `MeshConfig.gateway` is off) is one more
service: HTTPS with its `gateway` certificate (plain HTTP with --insecure), every scheduler
replica as its upstream, its tables in etcd as user tunemesh-gateway (`/tunemesh/gateway/`
only), a plaintext metrics endpoint Prometheus scrapes; `MeshState.gateway_url` is its URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from tunemesh.errors import FailedPreconditionError, InvalidArgumentError, UnavailableError
from tunemesh_common.membership import etcd_auth
from tunemesh_common.membership.etcd_process import (
    EtcdTlsFiles, etcd_argv, health_endpoint, pick_free_port, wait_healthy,
)
from tunemesh_common.security.tls import MeshTls
from tunemesh_common.service.settings import check_device
from tunemesh_local import keys, processes, prometheus, state
from tunemesh_local.certs import MeshCerts
from tunemesh_local.state import MeshState, ProcessRecord

ETCD_START_TIMEOUT_S = 15.0
HANDOFF_DIR = "handoff"  # under the checkpoint root: checkpoint files trainers hand over by rename


def local_trainer_threads(trainers: int) -> int:
    """Torch threads per trainer when the whole mesh shares this machine, split among
    trainers (at least 1). From 4 cores on, one core is left to etcd, the scheduler and
    clients; on 2 cores compute wins: halving a real model's arithmetic costs more than
    the control plane gains (bench/README.md has both measured)."""
    cores = os.cpu_count() or 2
    usable = cores - 1 if cores >= 4 else cores
    return max(1, usable // max(1, trainers))


def default_data_dir() -> Path:
    """The model cache trainers share: $TUNEMESH_DATA_DIR, else ~/.cache/tunemesh."""
    return Path(os.environ.get("TUNEMESH_DATA_DIR", "~/.cache/tunemesh")).expanduser()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """What `tunemesh up` was asked for."""

    state_dir: Path
    trainers: int = 1
    models: tuple[str, ...] = ()
    api_keys_file: Path | None = None  # a keys file of hashed keys; None: one in the state dir, made if absent
    tenants: tuple[str, ...] = keys.DEFAULT_TENANTS  # the state dir's keys file has a key for each
    # Plain-text development keys {key: tenant} the schedulers also accept (--insecure-dev-keys):
    # tests only, never a mesh others can reach.
    insecure_dev_keys: dict[str, str] | None = None
    ready_timeout: float = 120.0
    data_dir: Path | None = None  # model cache shared by trainers; None: the trainer's default
    checkpoint_dir: Path | None = None  # checkpoint store root; None: <state_dir>/checkpoints
    samplers: int = 1  # sampler processes (models assigned round-robin like trainers)
    sampler_engine: str = "auto"  # "auto", "vllm" or "torch"
    trainer_ranks: int = 1  # > 1: each trainer is a DeepSpeed ZeRO-3 group of this many local ranks
    trainer_expert_parallel: int = 1  # > 1: its ranks split each MoE layer's experts in groups of this many
    prometheus: bool = False  # also start a Prometheus scraping every service
    schedulers: int = 2  # scheduler replicas: one leads (etcd election), the others stand by
    # Passed on to the services only when set (else their own setting, env or default, holds):
    models_file: Path | None = None  # JSON list of extra local models, for trainers and samplers
    trainer_device: str | None = None  # cpu, cuda, cuda:N or auto
    trainer_dtype: str | None = None  # the frozen base's dtype: float32 or bfloat16
    sampler_device: str | None = None  # the torch engine's device
    sampler_dtype: str | None = None  # auto, float32 or bfloat16
    sampler_kv_cache_bytes: str | None = None  # vLLM's KV cache on CPU, bytes or with a unit ("2GiB")
    sampler_kv_cache_fraction: float | None = None  # vLLM on a GPU: share of the GPU's memory it takes
    # TLS on every hop, with certificates of a CA kept in <state_dir>/tls (or `ca_dir`);
    # insecure: plaintext everywhere, no peer authentication (development only).
    insecure: bool = False
    ca_dir: Path | None = None
    gateway: bool = True  # the Tinker HTTP gateway in front of the schedulers

    def certs(self) -> MeshCerts | None:
        """The issuer of this mesh's certificates; None with `insecure`."""
        return None if self.insecure else MeshCerts(self.state_dir / "tls", self.ca_dir)

    def log_file(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def ready_file(self, name: str) -> Path:
        return self.state_dir / "run" / f"{name}.ready.json"


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One service process to start: it must write `config.ready_file(name)` once serving."""

    name: str
    role: str
    argv: tuple[str, ...]


ServiceFactory = Callable[[MeshConfig, str, Path], list[ServiceSpec]]


def default_services(config: MeshConfig, etcd_endpoint: str, api_keys_file: Path) -> list[ServiceSpec]:
    """A checkpoint service, N trainers (models assigned round-robin, one per trainer),
    M samplers, the scheduler replicas and (with `config.gateway`) the Tinker gateway. The
    checkpoint service's port is picked first so the others can be told; so are the
    schedulers' when there are several or a gateway (which is told every replica). Each
    gets its certificate (or `--insecure true`)."""
    certs = config.certs()
    checkpoint = f"127.0.0.1:{pick_free_port()}"
    root = config.checkpoint_dir or config.state_dir / "checkpoints"
    handoff = _absolute(root) / HANDOFF_DIR  # every process runs on this host: trainers hand checkpoints over by rename
    specs = [ServiceSpec("checkpoint", "checkpoint", (
        sys.executable, "-m", "tunemesh_checkpoint", "--listen", checkpoint, "--root-dir", str(root),
        "--handoff-dir", str(handoff),
        "--ready-file", str(config.ready_file("checkpoint")), *tls_flags(certs, "checkpoint", "checkpoint"),
    ))]
    for index in range(config.trainers):
        node_id = f"trainer-{index}"
        argv = [sys.executable, "-m", "tunemesh_trainer", "--node-id", node_id, "--etcd", etcd_endpoint,
                "--listen", "127.0.0.1:0", "--ready-file", str(config.ready_file(node_id)),
                "--data-dir", str(config.data_dir or default_data_dir()), "--checkpoint", checkpoint,
                "--checkpoint-handoff-dir", str(handoff),
                *tls_flags(certs, node_id, "trainer", node_id)]
        if config.models:
            argv += ["--model", config.models[index % len(config.models)]]
        if "TUNEMESH_TRAINER_NUM_THREADS" not in os.environ:
            argv += ["--num-threads", str(local_trainer_threads(config.trainers * config.trainer_ranks))]
        if config.trainer_ranks > 1:
            argv += ["--ranks", str(config.trainer_ranks)]
        if config.trainer_expert_parallel > 1:
            argv += ["--expert-parallel", str(config.trainer_expert_parallel)]
        argv += _optional_flags(models_file=_absolute(config.models_file), device=config.trainer_device,
                                dtype=config.trainer_dtype)
        specs.append(ServiceSpec(node_id, "trainer", tuple(argv)))
    specs += sampler_services(config, etcd_endpoint, checkpoint, certs)
    schedulers = []
    for index in range(config.schedulers):  # replicas get fixed ports: clients know every address
        name = "scheduler" if index == 0 else f"scheduler-{index}"
        port = pick_free_port() if config.schedulers > 1 or config.gateway else 0
        schedulers.append(f"127.0.0.1:{port}")
        argv = [sys.executable, "-m", "tunemesh_scheduler", "--etcd", etcd_endpoint,
                "--listen", f"127.0.0.1:{port}", "--ready-file", str(config.ready_file(name)),
                "--api-keys-file", str(api_keys_file), "--checkpoint", checkpoint,
                *tls_flags(certs, name, "scheduler")]
        if config.insecure_dev_keys:
            pairs = ",".join(f"{key}={tenant}" for key, tenant in config.insecure_dev_keys.items())
            argv += ["--insecure-dev-keys", "true", "--api-keys", pairs]
        specs.append(ServiceSpec(name, "scheduler", tuple(argv)))
    if config.gateway:
        # inline development keys live in the schedulers' flags only: the gateway then leaves keys to them
        keys_here = None if config.insecure_dev_keys else api_keys_file
        specs.append(gateway_service(config, etcd_endpoint, schedulers, certs, keys_here))
    return specs


def gateway_service(config: MeshConfig, etcd_endpoint: str, schedulers: list[str],
                    certs: MeshCerts | None = None, api_keys_file: Path | None = None) -> ServiceSpec:
    """The Tinker gateway before `schedulers` (every replica: it calls whichever leads),
    verifying API keys against the schedulers' `api_keys_file` before it forwards them. With
    `certs`: HTTPS with the `gateway` certificate, which also proves etcd user
    tunemesh-gateway (its tables only); the mesh CA checks the scheduler and etcd."""
    argv = [sys.executable, "-m", "tunemesh_gateway", "--listen", "127.0.0.1:0", "--scheduler", ",".join(schedulers),
            "--etcd", etcd_endpoint, "--ready-file", str(config.ready_file("gateway")),
            "--metrics-listen", "127.0.0.1:0"]
    if api_keys_file is not None:
        argv += ["--api-keys-file", str(api_keys_file)]
    if certs is None:
        argv += ["--insecure", "true"]
    else:
        issued = certs.issue("gateway", "gateway")
        argv += ["--ca-bundle", str(issued.ca), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
                 "--etcd-tls-cert", str(issued.cert), "--etcd-tls-key", str(issued.key)]
    return ServiceSpec("gateway", "gateway", tuple(argv))


def tls_flags(certs: MeshCerts | None, name: str, role: str, node_id: str = "") -> list[str]:
    """A service's TLS flags: its certificate's files, or `--insecure true` without `certs`."""
    return ["--insecure", "true"] if certs is None else certs.issue(name, role, node_id).flags()


def sampler_services(config: MeshConfig, etcd_endpoint: str, checkpoint: str,
                     certs: MeshCerts | None = None) -> list[ServiceSpec]:
    """`config.samplers` samplers; each fetches adapters from the checkpoint service."""
    specs = []
    for index in range(config.samplers):
        node_id = f"sampler-{index}"
        argv = [sys.executable, "-m", "tunemesh_sampler", "--node-id", node_id, "--etcd", etcd_endpoint,
                "--listen", "127.0.0.1:0", "--ready-file", str(config.ready_file(node_id)),
                "--data-dir", str(config.data_dir or default_data_dir()), "--checkpoint", checkpoint,
                "--engine", config.sampler_engine, "--cache-dir", str(config.state_dir / "samplers"),
                *tls_flags(certs, node_id, "sampler", node_id)]
        if config.models:
            argv += ["--model", config.models[index % len(config.models)]]
        if "TUNEMESH_SAMPLER_NUM_THREADS" not in os.environ:
            argv += ["--num-threads", str(local_trainer_threads(config.trainers))]
        argv += _optional_flags(models_file=_absolute(config.models_file), device=config.sampler_device,
                                dtype=config.sampler_dtype, kv_cache_bytes=config.sampler_kv_cache_bytes,
                                kv_cache_fraction=config.sampler_kv_cache_fraction)
        specs.append(ServiceSpec(node_id, "sampler", tuple(argv)))
    return specs


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).expanduser().resolve()


def _optional_flags(**values: object) -> list[str]:
    """`--kebab-name value` for each value that is set."""
    return [part for name, value in values.items() if value is not None
            for part in ("--" + name.replace("_", "-"), str(value))]


def ensure_api_keys(config: MeshConfig) -> Path:
    """The given keys file (checked), else the state dir's, with a fresh key for each of
    `config.tenants` that has none yet (`keys.client_keys(state_dir)` reads them)."""
    if config.api_keys_file is not None:
        path = Path(config.api_keys_file).expanduser().resolve()
        if not keys.read(path):
            raise InvalidArgumentError("BAD_API_KEYS_FILE", f"{path} holds no API keys "
                                       "(make one with `tunemesh keys create --tenant T --file FILE`)")
        return path
    return keys.ensure_mesh_keys(config.state_dir, config.tenants)


def client_keys(mesh: MeshState) -> dict[str, str]:
    """{tenant: API key} of the keys `tunemesh up` made for `mesh` ({} with --api-keys-file)."""
    return keys.client_keys(Path(mesh.state_dir))


def live_processes(mesh: MeshState) -> list[ProcessRecord]:
    return [p for p in mesh.processes if processes.is_alive(p.pid, p.start_time)]


def _check_config(config: MeshConfig) -> None:
    if config.trainer_ranks < 1:
        raise InvalidArgumentError("BAD_TRAINER_RANKS", f"--trainer-ranks must be >= 1, got {config.trainer_ranks}")
    if config.trainer_expert_parallel < 1 or config.trainer_ranks % config.trainer_expert_parallel:
        raise InvalidArgumentError("BAD_EXPERT_PARALLEL", f"--trainer-expert-parallel {config.trainer_expert_parallel} "
                                                     f"must divide --trainer-ranks {config.trainer_ranks}")
    if config.trainers < 1:
        raise InvalidArgumentError("BAD_TRAINERS", f"--trainers must be >= 1, got {config.trainers}")
    if config.schedulers < 1:
        raise InvalidArgumentError("BAD_SCHEDULERS", f"--schedulers must be >= 1, got {config.schedulers}")
    if config.samplers < 0:
        raise InvalidArgumentError("BAD_SAMPLERS", f"--samplers must be >= 0, got {config.samplers}")
    if config.sampler_engine not in ("auto", "vllm", "torch"):
        raise InvalidArgumentError("BAD_SAMPLER_ENGINE", f"--sampler-engine must be auto, vllm or torch, got {config.sampler_engine!r}")
    if len(config.models) > config.trainers:
        raise InvalidArgumentError(
            "BAD_TRAINERS", f"{len(config.models)} models need at least as many trainers, got {config.trainers}"
        )
    _check_engine_flags(config)


def _check_engine_flags(config: MeshConfig) -> None:
    """The flags passed on to trainers and samplers, checked before anything starts."""
    for flag, device in (("--trainer-device", config.trainer_device), ("--sampler-device", config.sampler_device)):
        if device is not None:
            try:
                check_device(device)
            except ValueError as err:
                raise InvalidArgumentError("BAD_DEVICE", f"{flag}: {err}, got {device!r}") from None
    if config.trainer_dtype not in (None, "float32", "bfloat16"):
        raise InvalidArgumentError("BAD_DTYPE",
                                   f"--trainer-dtype must be float32 or bfloat16, got {config.trainer_dtype!r}")
    if config.sampler_dtype not in (None, "auto", "float32", "bfloat16"):
        raise InvalidArgumentError("BAD_DTYPE", f"--sampler-dtype must be auto, float32 or bfloat16, "
                                                f"got {config.sampler_dtype!r}")
    if config.sampler_kv_cache_fraction is not None and not 0 < config.sampler_kv_cache_fraction <= 1:
        raise InvalidArgumentError("BAD_KV_CACHE_FRACTION", "--sampler-kv-cache-fraction must be in (0, 1], "
                                                            f"got {config.sampler_kv_cache_fraction}")
    if config.models_file is not None and not Path(config.models_file).is_file():
        raise InvalidArgumentError("BAD_MODELS_FILE", f"--models-file {config.models_file} is not a file")


def _check_not_running(state_dir: Path) -> None:
    previous = state.load(state_dir)
    if previous is None:
        return
    alive = live_processes(previous)
    if alive:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in alive)
        raise FailedPreconditionError(
            "MESH_RUNNING",
            f"a mesh from {state_dir} is still running: {names}. Stop it with "
            f"`tunemesh down --state-dir {state_dir}` first.",
        )
    state.remove(state_dir)


def up(config: MeshConfig, services: ServiceFactory = default_services) -> MeshState:
    """Start etcd and every service, wait until each is ready, record and return the mesh.

    On any failure everything started so far is stopped and the state file removed.
    """
    _check_config(config)
    config = dataclasses.replace(config, state_dir=Path(config.state_dir).resolve())
    config.state_dir.mkdir(parents=True, exist_ok=True)
    _check_not_running(config.state_dir)
    shutil.rmtree(config.state_dir / "run", ignore_errors=True)  # stale ready files
    (config.state_dir / "run").mkdir()
    api_keys_file = ensure_api_keys(config)
    certs = config.certs()
    mesh = MeshState(str(config.state_dir), "", str(api_keys_file), [],
                     ca_file=str(certs.ca_file) if certs else "", tls_dir=str(certs.tls_dir) if certs else "")
    try:
        _start_etcd(config, mesh, certs)
        _start_services(config, mesh, services(config, mesh.etcd_endpoint, api_keys_file))
        if config.prometheus:
            _start_prometheus(config, mesh)
    except BaseException:
        _stop(mesh, grace=3.0)
        state.remove(config.state_dir)
        raise
    return mesh


def _start_etcd(config: MeshConfig, mesh: MeshState, certs: MeshCerts | None) -> None:
    """etcd on loopback; with `certs`, over mutual TLS with its users and roles set up
    (`etcd_auth`: only node certificates write node records) by the admin certificate."""
    client_port, peer_port = pick_free_port(), pick_free_port()
    endpoint = f"127.0.0.1:{client_port}"
    log_path = config.log_file("etcd")
    tls = metrics_port = None
    if certs is not None:
        etcd = certs.issue("etcd", "etcd")
        tls, metrics_port = EtcdTlsFiles(etcd.ca, etcd.cert, etcd.key), pick_free_port()
    argv = etcd_argv(config.state_dir / "etcd", client_port, peer_port, tls=tls, metrics_port=metrics_port)
    proc = processes.spawn(argv, log_path)
    mesh.etcd_endpoint = endpoint
    mesh.processes.append(ProcessRecord("etcd", "etcd", proc.pid, processes.start_time(proc.pid),
                                        str(log_path), address=endpoint, argv=list(argv)))
    state.save(mesh)
    try:
        wait_healthy(health_endpoint(argv), ETCD_START_TIMEOUT_S, proc)
        if certs is not None:
            admin = certs.issue("admin", "admin")
            asyncio.run(etcd_auth.enable_auth(endpoint, MeshTls.from_files(admin.ca, admin.cert, admin.key)))
    except UnavailableError as err:
        raise UnavailableError(err.reason, f"{err.message}; log {log_path}:\n{processes.tail(log_path)}") from err


def _start_services(config: MeshConfig, mesh: MeshState, specs: list[ServiceSpec]) -> None:
    started = []
    for spec in specs:
        log_path = config.log_file(spec.name)
        proc = processes.spawn(list(spec.argv), log_path)
        record = ProcessRecord(spec.name, spec.role, proc.pid, processes.start_time(proc.pid), str(log_path),
                               argv=list(spec.argv))
        mesh.processes.append(record)
        started.append((spec, proc, record))
    state.save(mesh)
    since = time.monotonic()
    for spec, proc, record in started:
        info = processes.wait_ready(spec.name, proc, config.ready_file(spec.name), Path(record.log_path),
                                    config.ready_timeout, since)
        record.address = str(info["address"])
        record.metrics_url = str(info.get("metrics_url", ""))
        if spec.role == "gateway":
            mesh.gateway_url = str(info.get("url") or f"http://{record.address}")
    mesh.scheduler_address = ",".join(p.address for p in mesh.by_role("scheduler"))
    state.save(mesh)


def restart(state_dir: Path, name: str, timeout: float = 120.0) -> ProcessRecord:
    """Start service `name` of a running mesh again, with its argv and on its address
    (clients keep their endpoint); the old process must be gone (killed or crashed)."""
    mesh = state.load(Path(state_dir))
    record = next((p for p in (mesh.processes if mesh else []) if p.name == name), None)
    if record is None or not record.argv:
        raise InvalidArgumentError("UNKNOWN_SERVICE", f"no restartable service {name!r} in the mesh of {state_dir}")
    if processes.is_alive(record.pid, record.start_time):
        raise FailedPreconditionError("SERVICE_RUNNING", f"{name} (pid {record.pid}) is still running")
    argv = list(record.argv)
    if record.role == "etcd":  # same ports and data dir
        proc = processes.spawn(argv, Path(record.log_path))
        record.pid, record.start_time = proc.pid, processes.start_time(proc.pid)
        state.save(mesh)
        wait_healthy(health_endpoint(argv), ETCD_START_TIMEOUT_S, proc)
        return record
    argv[argv.index("--listen") + 1] = record.address
    ready_file = Path(argv[argv.index("--ready-file") + 1])
    ready_file.unlink(missing_ok=True)
    proc = processes.spawn(argv, Path(record.log_path))
    record.pid, record.start_time = proc.pid, processes.start_time(proc.pid)
    state.save(mesh)
    info = processes.wait_ready(name, proc, ready_file, Path(record.log_path), timeout)
    record.metrics_url = str(info.get("metrics_url", ""))
    state.save(mesh)
    return record


def _start_prometheus(config: MeshConfig, mesh: MeshState) -> None:
    """Write prometheus.yml for the services' metrics URLs, start Prometheus on a free
    loopback port and wait until it is ready."""
    config_file = config.state_dir / "prometheus.yml"
    rules = [prometheus.ALERT_RULES] if prometheus.ALERT_RULES.is_file() else []
    config_file.write_text(prometheus.scrape_config(mesh.processes, rule_files=rules))
    listen = f"127.0.0.1:{pick_free_port()}"
    log_path = config.log_file(prometheus.ROLE)
    proc = processes.spawn(prometheus.argv(config_file, config.state_dir / "prometheus", listen), log_path)
    mesh.processes.append(ProcessRecord(prometheus.ROLE, prometheus.ROLE, proc.pid, processes.start_time(proc.pid),
                                        str(log_path), address=listen))
    state.save(mesh)
    prometheus.wait_ready(f"http://{listen}", proc, log_path, config.ready_timeout)
    mesh.prometheus_url = f"http://{listen}"
    state.save(mesh)


def _stop(mesh: MeshState, grace: float) -> None:
    """Services first (so trainers can revoke their leases), etcd last."""
    services = [(p.pid, p.start_time) for p in mesh.processes if p.role != "etcd"]
    processes.terminate(services, grace)
    processes.terminate([(p.pid, p.start_time) for p in mesh.by_role("etcd")], grace)


def down(state_dir: Path, grace: float = 10.0) -> MeshState | None:
    """Stop the mesh recorded in `state_dir` and remove its state file; None if none recorded."""
    mesh = state.load(Path(state_dir))
    if mesh is None:
        return None
    _stop(mesh, grace)
    state.remove(Path(state_dir))
    return mesh
