"""Handles on a running mesh's processes for the fault suite: `kill` (SIGKILL, reaped) and
`restart` (same command line, same address), sent by the test itself."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tunemesh_local import launcher, processes, state
from tunemesh_local.state import MeshState, ProcessRecord

MODEL = "tunemesh/tiny-dense"
ENV = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
       # tiny-dense steps take milliseconds: snapshot every 8 steps as they come, so the
       # faults hit runs with a snapshot and a log after it (the service holds them 2 s apart)
       "TUNEMESH_SCHEDULER_SNAPSHOT_MIN_INTERVAL_S": "0"}


def leader(mesh: MeshState) -> str:
    """The name of the scheduler replica that leads now (from its ready file)."""
    for record in state.load(Path(mesh.state_dir)).by_role("scheduler"):
        ready = Path(mesh.state_dir) / "run" / f"{record.name}.ready.json"
        if ready.is_file() and json.loads(ready.read_text()).get("role") == "leader" \
                and processes.is_alive(record.pid, record.start_time):
            return record.name
    raise AssertionError("no scheduler replica leads")


def process(mesh: MeshState, name: str) -> ProcessRecord:
    return next(p for p in state.load(Path(mesh.state_dir)).processes if p.name == name)


def kill(mesh: MeshState, name: str) -> None:
    """SIGKILL process `name` and reap it: gone for sure when this returns."""
    record = process(mesh, name)
    os.kill(record.pid, signal.SIGKILL)
    processes.terminate([(record.pid, record.start_time)], grace=5.0)


def restart(mesh: MeshState, name: str) -> None:
    """Start `name` again with its command line, on its address (bounded wait)."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENV.items():
            patch.setenv(key, value)
        launcher.restart(Path(mesh.state_dir), name)
