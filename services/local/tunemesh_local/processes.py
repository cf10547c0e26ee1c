"""Background processes of a local mesh: spawn, readiness, liveness, termination."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tunemesh.errors import UnavailableError

LOOPBACK = "127.0.0.1,localhost"
# Set by torchrun / a rank group for its own ranks. A mesh service that inherited them
# would take itself for a rank of that group: trainers get their ranks from --ranks.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT")
LOG_TAIL_LINES = 30
# A local mesh's engines share the machine with each other, etcd, the scheduler and the
# clients: OpenMP threads that spin at barriers while a neighbour holds their core made a
# SmolLM2 training step 61x slower (bench/README.md, contention.py); sleeping ones cost
# ~1.3x at worst. Set OMP_WAIT_POLICY yourself to choose otherwise.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with loopback exempt from any HTTP proxy (it would capture gRPC),
    without a process group's rank variables, and OpenMP threads that sleep rather than
    spin unless this environment says otherwise (OPENMP_DEFAULTS)."""
    env = {**OPENMP_DEFAULTS}
    env.update({k: v for k, v in os.environ.items() if k not in RANK_VARIABLES and not k.startswith("TORCHELASTIC_")})
    for name in ("no_proxy", "NO_PROXY"):
        env[name] = ",".join(filter(None, [env.get(name, ""), LOOPBACK]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def spawn(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` in its own session (survives the launcher), output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env if env is not None else child_env(),
            start_new_session=True,
        )


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot), to tell it from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(pid: int, started: int | None = None) -> bool:
    """True if `pid` runs, is not a zombie and (when known) started at `started`."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat_path = Path(f"/proc/{pid}/stat")
    if stat_path.exists():
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return False
        if fields[0] in ("Z", "X"):
            return False
        if started is not None and int(fields[19]) != started:
            return False
    return True


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own exited child (in-process launches, tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate(pids: list[tuple[int, int | None]], grace: float = 10.0) -> None:
    """SIGTERM each live (pid, start_time) process group, SIGKILL whatever is left after `grace`."""
    live = [(pid, st) for pid, st in pids if is_alive(pid, st)]
    for pid, _ in live:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [(pid, st) for pid, st in live if is_alive(pid, st)]
        time.sleep(0.05)
    for pid, _ in live:
        _signal_group(pid, signal.SIGKILL)
    for pid, st in live:
        while is_alive(pid, st):
            time.sleep(0.02)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid` (it was spawned as a session leader)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last `lines` lines of a log file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(
    name: str, proc: subprocess.Popen, ready_file: Path, log_path: Path, timeout: float, since: float | None = None
) -> dict:
    """Wait until `timeout` s after `since` (monotonic; default now) for `ready_file` (JSON with
    at least "address"); raise UnavailableError with the tail of the process's log."""
    deadline = (time.monotonic() if since is None else since) + timeout
    while time.monotonic() < deadline:
        info = _read_ready(ready_file)
        if info is not None:
            return info
        if proc.poll() is not None:
            raise UnavailableError("SERVICE_EXITED", _failure(name, f"exited with code {proc.returncode}", log_path))
        time.sleep(0.05)
    raise UnavailableError("SERVICE_NOT_READY", _failure(name, f"not ready after {timeout:.0f}s", log_path))


def _read_ready(ready_file: Path) -> dict | None:
    try:
        info = json.loads(ready_file.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "address" in info else None


def _failure(name: str, what: str, log_path: Path) -> str:
    return f"{name} {what}; log {log_path}:\n{tail(log_path) or '(empty)'}"
