"""The service's side of checkpoint files handed over by rename (AdoptCheckpoint).

Callers on this host write a checkpoint's files into `<handoff_dir>/<token>/` and name
them in AdoptCheckpoint (the layout and the caller's side: tunemesh_common.checkpoints.
handoff). The service checks the names, the sizes (against the files themselves) and the
tenant's quota, moves the files into a store writer and commits it like a streamed write;
the digests are the caller's, and every read verifies them. Only mesh peers reach
AdoptCheckpoint (mutual TLS), and the directory is the mesh user's alone (mode 0700).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import stat
import time

from tunemesh.errors import InvalidArgumentError, ResourceExhaustedError
from tunemesh_checkpoint.catalog import CheckpointCatalog, CheckpointRecord, CheckpointSpec, check_file_name
from tunemesh_checkpoint.store import BlobInfo
from tunemesh_common.checkpoints.handoff import TOKEN

log = logging.getLogger(__name__)


class HandoffDir:
    """Where callers on this host leave checkpoint files for the store to take."""

    def __init__(self, path: pathlib.Path, store_root: pathlib.Path, max_age_s: float = 3600.0) -> None:
        """Create `path` if needed; ValueError unless it lies on `store_root`'s filesystem
        (a rename cannot cross filesystems)."""
        self.path = pathlib.Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(self.path).st_dev != os.stat(store_root).st_dev:
            raise ValueError(f"the handoff directory {self.path} is not on the filesystem of the store {store_root}")
        self.max_age_s = max_age_s

    def take(self, catalog: CheckpointCatalog, tenant: str, spec: CheckpointSpec, token: str,
             files: list, max_bytes: int) -> CheckpointRecord:
        """Commit the files handed over under `token` (CheckpointFile messages: name,
        size_bytes, sha256) as the checkpoint `spec`; the token's directory is removed
        whether they were taken or refused."""
        if not TOKEN.fullmatch(token):
            raise InvalidArgumentError("BAD_HANDOFF", f"{token[:80]!r} is not a handoff token (32 hex digits)")
        directory = self.path / token
        try:
            described = _described(files, max_bytes)
            _check_directory(directory, token)
            with catalog.open_write(tenant, spec) as writer:
                written = [writer.adopt_blob(info.name, directory / info.name, info) for info in described]
                return catalog.commit(writer, spec, written)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def sweep(self, now: float | None = None) -> int:
        """Remove handoffs older than `max_age_s` (their caller died before handing them
        over); returns how many."""
        cutoff = (time.time() if now is None else now) - self.max_age_s
        removed = 0
        for entry in os.scandir(self.path):
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue  # taken meanwhile
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                pathlib.Path(entry.path).unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("handoff directory %s: removed %d leftovers older than %.0f s", self.path, removed, self.max_age_s)
        return removed


def _check_directory(directory: pathlib.Path, token: str) -> None:
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        raise InvalidArgumentError("BAD_HANDOFF", f"no handoff {token} in {directory.parent}") from None
    if not stat.S_ISDIR(mode):
        raise InvalidArgumentError("BAD_HANDOFF", f"handoff {token} is not a directory")


def _described(files: list, max_bytes: int) -> list[BlobInfo]:
    """The declared files, each named once and at most `max_bytes` in all."""
    described, names = [], set()
    for file in files:
        name = check_file_name(file.name)
        if name in names:
            raise InvalidArgumentError("BAD_HANDOFF", f"{name[:100]!r} is declared twice")
        if file.size_bytes < 0:
            raise InvalidArgumentError("BAD_HANDOFF", f"{name[:100]!r} declares {file.size_bytes} bytes")
        names.add(name)
        described.append(BlobInfo(name, file.size_bytes, file.sha256))
    total = sum(info.size for info in described)
    if total > max_bytes:
        raise ResourceExhaustedError("UPLOAD_TOO_LARGE", f"checkpoints are limited to {max_bytes} bytes, got {total}")
    return described
