"""Checkpoint service settings: flags, else `TUNEMESH_CHECKPOINT_*` environment variables, else defaults."""

from __future__ import annotations

import pathlib

from pydantic import Field

from tunemesh_common.service import settings
from tunemesh_common.service.settings import HostPort, HostPortOrEmpty


class CheckpointSettings(settings.ServiceSettings):
    """Durable adapter checkpoints on a filesystem root (`python -m tunemesh_checkpoint`)."""

    model_config = settings.settings_config("checkpoint")

    listen: HostPort = Field("127.0.0.1:0", description="host:port to serve on; port 0 picks a free one")
    root_dir: pathlib.Path = Field(pathlib.Path("~/.tunemesh/checkpoints"), description="filesystem store root")
    ready_file: pathlib.Path | None = Field(
        None, description='written once serving: {"address", "pid", "metrics_url"} (for launchers)')
    metrics_listen: HostPortOrEmpty = Field("127.0.0.1:0",
                                description="host:port of /metrics (port 0 picks one); empty: no metrics endpoint")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often expired checkpoints are deleted, in seconds")
    chunk_bytes: int = Field(1 << 20, ge=1, description="size of streamed file chunks, in bytes")
    max_upload_bytes: int = Field(4 << 30, ge=1,
                                  description="largest checkpoint written or imported in one stream, in bytes")
    handoff_dir: pathlib.Path | None = Field(
        None, description="a directory on the root's filesystem where trainers on this host leave checkpoint files "
                          "for the service to take by rename (AdoptCheckpoint) instead of streaming them; "
                          "created mode 0700; unset: none")
    handoff_max_age_s: float = Field(
        3600.0, gt=0, description="handoffs older than this are removed (their trainer died before handing them over)")
    max_bytes_per_tenant: int = Field(
        10 << 30, ge=0,
        description="bytes a tenant's checkpoints may hold in all (writes in progress included; automatic run "
                    "snapshots not counted); a write past it fails RESOURCE_EXHAUSTED [STORAGE_QUOTA]; 0: no quota")


def load(argv: list[str] | None = None) -> CheckpointSettings:
    return settings.load(CheckpointSettings, argv)
