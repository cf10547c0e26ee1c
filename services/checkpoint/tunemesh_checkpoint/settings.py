"""Checkpoint service settings: flags, else `TUNEMESH_CHECKPOINT_*` environment variables, else defaults."""

from __future__ import annotations

import dataclasses
import pathlib

from tunemesh_common import settings


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one
    root_dir: pathlib.Path = pathlib.Path("~/.tunemesh/checkpoints")  # filesystem store root
    ready_file: pathlib.Path | None = None  # written once serving: {"address", "pid", "metrics_url"}
    metrics_listen: str = "127.0.0.1:0"  # host:port of /metrics (port 0 picks one); empty: none
    sweep_interval_s: float = 60.0  # how often expired checkpoints are deleted
    chunk_bytes: int = 1 << 20  # size of streamed file chunks
    max_upload_bytes: int = 4 << 30  # largest checkpoint written or imported in one stream


def load(argv: list[str] | None = None) -> CheckpointSettings:
    return settings.load(CheckpointSettings, "TUNEMESH_CHECKPOINT_", argv)
