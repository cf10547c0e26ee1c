"""The state file of a local mesh: `<state-dir>/mesh.json`.

Default state dir: `$TUNEMESH_STATE_DIR` if set, else `~/.tunemesh/local`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from tunemesh.errors import FailedPreconditionError

STATE_FILE = "mesh.json"
STATE_DIR_ENV = "TUNEMESH_STATE_DIR"


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV]).expanduser()
    return Path.home() / ".tunemesh" / "local"


@dataclasses.dataclass
class ProcessRecord:
    """One process of the mesh. `start_time` guards against pid reuse."""

    name: str
    role: str
    pid: int
    start_time: int | None
    log_path: str
    address: str = ""
    metrics_url: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)  # how it was started (services)


@dataclasses.dataclass
class MeshState:
    """Everything `tunemesh status` and `tunemesh down` need."""

    state_dir: str
    etcd_endpoint: str
    api_keys_file: str
    processes: list[ProcessRecord]
    scheduler_address: str = ""  # every scheduler replica, comma-separated (the SDK takes the list)
    prometheus_url: str = ""  # with `tunemesh up --prometheus`
    ca_file: str = ""  # the mesh CA's certificate, for clients (TUNEMESH_CA_BUNDLE); "" with --insecure
    tls_dir: str = ""  # the processes' certificates (admin.pem: `tunemesh status`'s); "" with --insecure
    gateway_url: str = ""  # the Tinker gateway's base URL (https, or http with --insecure); "" without one

    def by_role(self, role: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == role]


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def save(state: MeshState) -> Path:
    """Write the state file atomically (temp file, fsync, rename)."""
    path = state_path(Path(state.state_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(state), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(state_dir: Path) -> MeshState | None:
    """The recorded mesh, or None when there is no state file."""
    path = state_path(state_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise FailedPreconditionError("BAD_STATE_FILE", f"{path} is not valid JSON: {err}") from err
    try:
        processes = [ProcessRecord(**p) for p in raw.pop("processes")]
        return MeshState(processes=processes, **raw)
    except (KeyError, TypeError) as err:
        raise FailedPreconditionError("BAD_STATE_FILE", f"{path} has an unexpected layout: {err}") from err


def remove(state_dir: Path) -> None:
    state_path(state_dir).unlink(missing_ok=True)
