"""Per-tenant storage quota: the bytes each tenant's checkpoints hold, counted atomically.

`TenantUsage` keeps, per tenant storage segment, the bytes of its committed checkpoints
(`used`) and of the writes in progress (`reserved`). A write reserves every chunk before
the store writes it, so concurrent writes of one tenant can never together pass the
quota, and a refused write stops before its chunk reaches the disk (the store removes
the partial file). `QuotaWriter` wraps a store's writer to do this. Deletes and expiry
give the bytes back; at start the usage is counted from the store.

Automatic snapshots of runs (`is_snapshot`) are neither counted nor refused: they are
the mesh's own insurance for moving a run, at most a few per run, and a tenant at its
quota must still have its runs snapshotted.
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterable, Iterator

from tunemesh_checkpoint.store import BlobInfo, CheckpointStore, CheckpointWriter, Manifest
from tunemesh_common.checkpoints.paths import is_snapshot
from tunemesh.errors import ResourceExhaustedError


class TenantUsage:
    """Bytes held and being written per tenant segment; `limit_bytes` 0 means no quota.
    Thread-safe: the checkpoint service writes from worker threads."""

    def __init__(self, limit_bytes: int = 0) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}
        self._reserved: dict[str, int] = {}

    @classmethod
    def counted(cls, store: CheckpointStore, limit_bytes: int = 0) -> TenantUsage:
        """The usage of every tenant as the store holds it now (expired checkpoints
        included, until the sweep deletes them)."""
        usage = cls(limit_bytes)
        for manifest in store.list(""):
            usage.add(manifest.key, manifest.size_bytes)
        return usage

    def used(self, segment: str) -> int:
        """Committed bytes of the tenant's checkpoints."""
        with self._lock:
            return self._used.get(segment, 0)

    def reserved(self, segment: str) -> int:
        """Bytes of the tenant's writes in progress."""
        with self._lock:
            return self._reserved.get(segment, 0)

    def check_room(self, key: str) -> None:
        """ResourceExhaustedError(STORAGE_QUOTA) when the tenant of storage `key` has no
        byte left (snapshots always have room)."""
        if not is_snapshot(key):
            self._reserve(segment_of(key), 0, at_least=1)

    def reserve(self, segment: str, size: int) -> None:
        """Count `size` more bytes as being written, or raise STORAGE_QUOTA if that would
        pass the quota."""
        self._reserve(segment, size, at_least=0)

    def _reserve(self, segment: str, size: int, at_least: int) -> None:
        with self._lock:
            used, reserved = self._used.get(segment, 0), self._reserved.get(segment, 0)
            wanted = used + reserved + max(size, at_least)
            if self.limit_bytes and wanted > self.limit_bytes:
                raise ResourceExhaustedError(
                    "STORAGE_QUOTA",
                    f"the tenant's checkpoints hold {used} bytes and {reserved} more are being written; "
                    f"{size} more would pass its quota of {self.limit_bytes} bytes "
                    "(delete checkpoints or give them a TTL)",
                )
            self._reserved[segment] = reserved + size

    def release(self, segment: str, size: int) -> None:
        """A write gave up `size` reserved bytes."""
        with self._lock:
            _add(self._reserved, segment, -size)

    def settle(self, segment: str, reserved: int, committed: int) -> None:
        """A write committed: its reservation becomes `committed` used bytes."""
        with self._lock:
            _add(self._reserved, segment, -reserved)
            _add(self._used, segment, committed)

    def add(self, key: str, size: int) -> None:
        """A committed checkpoint at storage `key` holds `size` bytes (counting at start)."""
        if not is_snapshot(key):
            with self._lock:
                _add(self._used, segment_of(key), size)

    def free(self, key: str, size: int) -> None:
        """The checkpoint at storage `key` (of `size` bytes) was deleted or expired."""
        if not is_snapshot(key):
            with self._lock:
                _add(self._used, segment_of(key), -size)


class QuotaWriter(CheckpointWriter):
    """A store writer whose every chunk is reserved in `usage` before it is written; the
    reservation becomes usage on commit and is released on abort."""

    def __init__(self, writer: CheckpointWriter, usage: TenantUsage, key: str) -> None:
        self._writer, self._usage = writer, usage
        self.key = key
        self._segment = segment_of(key)
        self._counted = not is_snapshot(key)
        self._reserved = 0

    @property
    def committed(self) -> bool:
        return self._writer.committed

    def write_blob(self, name: str, chunks: Iterable[bytes]) -> BlobInfo:
        return self._writer.write_blob(name, self._reserving(chunks) if self._counted else chunks)

    def adopt_blob(self, name: str, source: pathlib.Path, info: BlobInfo) -> BlobInfo:
        if self._counted:
            self._usage.reserve(self._segment, info.size)
            self._reserved += info.size
        return self._writer.adopt_blob(name, source, info)

    def _reserving(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self._usage.reserve(self._segment, len(chunk))
            self._reserved += len(chunk)
            yield chunk

    def commit(self, metadata: dict) -> Manifest:
        manifest = self._writer.commit(metadata)
        if self._counted:
            self._usage.settle(self._segment, self._reserved, manifest.size_bytes)
            self._reserved = 0
        return manifest

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self._usage.release(self._segment, self._reserved)
            self._reserved = 0


def segment_of(key: str) -> str:
    """The tenant segment a storage key lies under (its first part)."""
    return key.partition("/")[0]


def _add(counts: dict[str, int], segment: str, delta: int) -> None:
    value = counts.get(segment, 0) + delta
    if value > 0:
        counts[segment] = value
    else:
        counts.pop(segment, None)
