"""Checkpoint storage: immutable, named sets of blobs with a JSON manifest.

`CheckpointStore` is the Protocol an object-store backend would also implement;
`FilesystemStore` keeps checkpoints under one root directory:

    objects/<key>/manifest.json     a checkpoint iff this file exists
    objects/<key>/<blob files>
    staging/<random>/               writes in progress
    trash/<random>/                 deletes in progress

A write fills a staging directory and publishes it with one `os.rename`, so a
reader sees a checkpoint whole or not at all. `recover()` removes what a crash
left in staging/ and trash/.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import pathlib
import re
import secrets
import shutil
import stat
import threading
import time
import typing
from collections.abc import Iterable, Iterator

from tunemesh_checkpoint.manifest import (  # noqa: F401  (re-exported: the store's vocabulary)
    _MANIFEST_TMP, MANIFEST_NAME, BlobInfo, Manifest, canonical_metadata, manifest_json, parse_manifest,
    validate_blob_name, validate_key,
)
from tunemesh.errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)

logger = logging.getLogger(__name__)

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def disk_full_as_exhausted(what: str) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside into ResourceExhaustedError(DISK_FULL): a full
    disk is a capacity limit the client can act on, not an INTERNAL bug. The caller
    removes what it wrote."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL_ERRNOS:
            raise
        logger.warning("%s: %s", what, exc)
        raise ResourceExhaustedError(
            "DISK_FULL", f"the checkpoint service's disk is full ({os.strerror(exc.errno)}) while {what}"
        ) from None


class CheckpointWriter(abc.ABC):
    """One checkpoint being written. As a context manager it aborts unless committed."""

    key: str  # where it is committed

    @abc.abstractmethod
    def write_blob(self, name: str, chunks: Iterable[bytes]) -> BlobInfo:
        """Stores one blob from a stream of chunks; returns its size and sha256."""

    @abc.abstractmethod
    def adopt_blob(self, name: str, source: pathlib.Path, info: BlobInfo) -> BlobInfo:
        """Takes one blob that is already a whole, flushed file at `source` (on the store's
        filesystem) by moving it in. Its size must be `info.size`; `info.sha256` is
        recorded as the caller computed it (every read verifies it)."""

    @abc.abstractmethod
    def commit(self, metadata: dict) -> Manifest:
        """Publishes every written blob at once; AlreadyExistsError if the key is taken."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops everything written. Idempotent."""

    @property
    @abc.abstractmethod
    def committed(self) -> bool:
        """Whether commit() succeeded."""

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.committed:
            self.abort()


@typing.runtime_checkable
class CheckpointStore(typing.Protocol):
    """Immutable checkpoints addressed by "/"-separated keys."""

    def writer(self, key: str) -> CheckpointWriter: ...

    def manifest(self, key: str) -> Manifest: ...

    def read_blob(self, key: str, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...

    def list(self, prefix: str) -> list[Manifest]: ...

    def update_metadata(self, key: str, metadata: dict) -> Manifest: ...

    def delete(self, key: str) -> None: ...

    def recover(self) -> int: ...


class FilesystemStore:
    """CheckpointStore on a local (or mounted) filesystem under `root`.

    One process owns a root. A lock serializes the steps that change objects/
    (publish, delete, metadata rewrite) among this store's threads.
    """

    def __init__(self, root: pathlib.Path, *, fsync: bool = True) -> None:
        self.root = pathlib.Path(root)
        self._objects = self.root / "objects"
        self._staging = self.root / "staging"
        self._trash = self.root / "trash"
        self._fsync = fsync
        self._lock = threading.Lock()
        for path in (self._objects, self._staging, self._trash):
            path.mkdir(parents=True, exist_ok=True)

    def writer(self, key: str) -> CheckpointWriter:
        validate_key(key)
        staging_dir = self._staging / secrets.token_hex(16)
        with disk_full_as_exhausted(f"writing {key!r}"):
            staging_dir.mkdir()
        return _FilesystemWriter(self, key, staging_dir)

    def manifest(self, key: str) -> Manifest:
        validate_key(key)
        try:
            raw = (self._objects / key / MANIFEST_NAME).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError("CHECKPOINT_NOT_FOUND", f"no checkpoint {key!r}") from None
        return parse_manifest(key, raw)

    def read_blob(self, key: str, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Streams a blob, verifying size and sha256 as it goes.

        Errors about the checkpoint or blob are raised by this call; a mismatch
        is only known at the end and raises DataLossError("CHECKSUM_MISMATCH") from
        the iterator after chunks were yielded, so callers must treat the whole
        stream as failed and discard what they received.
        """
        if chunk_size <= 0:
            raise InvalidArgumentError("BAD_CHUNK_SIZE", f"chunk_size must be positive, got {chunk_size}")
        info = self.manifest(key).blob(name)
        try:
            file = open(self._objects / key / name, "rb")
        except FileNotFoundError:
            raise DataLossError("BLOB_MISSING", f"blob {name!r} of checkpoint {key!r} is missing") from None
        return _verified_chunks(file, key, info, chunk_size)

    def list(self, prefix: str) -> list[Manifest]:
        """Committed checkpoints at or below `prefix` ("" = all), sorted by key.

        Checkpoints with a corrupt manifest are skipped with a warning.
        """
        if prefix:
            validate_key(prefix)
        found = []
        for key in self._keys_under(prefix):
            try:
                found.append(self.manifest(key))
            except NotFoundError:
                continue  # deleted while listing
            except DataLossError as err:
                logger.warning("skipping checkpoint %r in listing: %s", key, err.message)
        return sorted(found, key=lambda m: m.key)

    def update_metadata(self, key: str, metadata: dict) -> Manifest:
        metadata = canonical_metadata(metadata)
        with self._lock:
            manifest = dataclasses.replace(self.manifest(key), metadata=metadata)
            checkpoint_dir = self._objects / key
            tmp = checkpoint_dir / _MANIFEST_TMP
            try:
                with disk_full_as_exhausted(f"updating {key!r}"):
                    self._write_file(tmp, manifest_json(manifest))
                    os.replace(tmp, checkpoint_dir / MANIFEST_NAME)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._sync_dir(checkpoint_dir)
        return manifest

    def delete(self, key: str) -> None:
        validate_key(key)
        checkpoint_dir = self._objects / key
        trash_dir = self._trash / secrets.token_hex(16)
        with self._lock:
            if not (checkpoint_dir / MANIFEST_NAME).is_file():
                raise NotFoundError("CHECKPOINT_NOT_FOUND", f"no checkpoint {key!r}")
            os.rename(checkpoint_dir, trash_dir)
            self._sync_dir(checkpoint_dir.parent)
            self._remove_empty_parents(checkpoint_dir.parent)
        shutil.rmtree(trash_dir, ignore_errors=True)

    def recover(self) -> int:
        """Removes leftovers of interrupted writes and deletes; returns how many.

        Run it at start, before any writer of this root exists.
        """
        removed = 0
        for area in (self._staging, self._trash):
            for entry in area.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        for key in self._keys_under(""):
            stray = self._objects / key / _MANIFEST_TMP
            if stray.exists():
                stray.unlink()
                removed += 1
        if removed:
            logger.info("checkpoint store %s: removed %d leftovers of interrupted work", self.root, removed)
        return removed

    # -- internals used by _FilesystemWriter --------------------------------

    def _publish(self, staging_dir: pathlib.Path, key: str) -> None:
        """Renames a filled staging dir to objects/<key>: the commit point."""
        target = self._objects / key
        with self._lock:
            self._check_free(key)
            self._make_parents(target.parent)
            os.rename(staging_dir, target)
            self._sync_dir(target.parent)

    def _check_free(self, key: str) -> None:
        target = self._objects / key
        if (target / MANIFEST_NAME).exists():
            raise AlreadyExistsError("CHECKPOINT_EXISTS", f"checkpoint {key!r} already exists")
        if os.path.lexists(target):
            raise FailedPreconditionError("CHECKPOINT_KEY_CONFLICT", f"checkpoints exist below {key!r}")
        for parent in target.relative_to(self._objects).parents:
            if parent.parts and (self._objects / parent / MANIFEST_NAME).exists():
                raise FailedPreconditionError(
                    "CHECKPOINT_KEY_CONFLICT", f"{key!r} lies inside checkpoint {parent.as_posix()!r}"
                )

    def _write_file(self, path: pathlib.Path, data: bytes) -> None:
        with open(path, "wb") as file:
            file.write(data)
            file.flush()
            if self._fsync:
                os.fsync(file.fileno())

    def _sync_dir(self, path: pathlib.Path) -> None:
        if self._fsync:
            sync_dir(path)

    def _make_parents(self, path: pathlib.Path) -> None:
        """Creates path's missing directories, syncing each one's parent."""
        if path.is_dir():
            return
        self._make_parents(path.parent)
        path.mkdir(exist_ok=True)
        self._sync_dir(path.parent)

    def _remove_empty_parents(self, path: pathlib.Path) -> None:
        while path != self._objects:
            try:
                path.rmdir()
            except OSError:
                return  # not empty, or already gone
            path = path.parent

    def _keys_under(self, prefix: str) -> Iterator[str]:
        """Keys of the checkpoint directories at or below objects/<prefix>."""
        start = self._objects / prefix if prefix else self._objects
        pending = [start]
        while pending:
            path = pending.pop()
            if path != self._objects and (path / MANIFEST_NAME).exists():
                yield path.relative_to(self._objects).as_posix()
                continue
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            pending.extend(pathlib.Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_handed_file(path: pathlib.Path, name: str, size: int) -> None:
    """InvalidArgumentError(BAD_HANDOFF) unless `path` is a regular file of `size` bytes
    with no other name (not a link, not shared with another file)."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        raise InvalidArgumentError("BAD_HANDOFF", f"no file {name!r} was handed over") from None
    if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
        raise InvalidArgumentError("BAD_HANDOFF", f"{name!r} is not a regular file with one name")
    if status.st_size != size:
        raise InvalidArgumentError("BAD_HANDOFF", f"{name!r} holds {status.st_size} bytes, not the {size} declared")


def _verified_chunks(file: typing.BinaryIO, key: str, info: BlobInfo, chunk_size: int) -> Iterator[bytes]:
    with file:
        digest = hashlib.sha256()
        size = 0
        while chunk := file.read(chunk_size):
            size += len(chunk)
            if size > info.size:
                break
            digest.update(chunk)
            yield chunk
    if size != info.size or digest.hexdigest() != info.sha256:
        raise DataLossError(
            "CHECKSUM_MISMATCH",
            f"blob {info.name!r} of checkpoint {key!r} does not match its manifest",
        )


class _FilesystemWriter(CheckpointWriter):
    """Writes blobs into a private staging directory until commit or abort."""

    def __init__(self, store: FilesystemStore, key: str, staging_dir: pathlib.Path) -> None:
        self.key = key
        self._store = store
        self._dir = staging_dir
        self._blobs: dict[str, BlobInfo] = {}
        self._closed = False
        self._committed = False

    @property
    def committed(self) -> bool:
        return self._committed

    def write_blob(self, name: str, chunks: Iterable[bytes]) -> BlobInfo:
        self._check_open()
        validate_blob_name(name)
        if name in self._blobs:
            raise AlreadyExistsError("BLOB_EXISTS", f"blob {name!r} was already written")
        path = self._dir / name
        try:
            with disk_full_as_exhausted(f"writing {name!r} of {self.key!r}"):
                info = self._stream_to(path, name, chunks)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._blobs[name] = info
        return info

    def adopt_blob(self, name: str, source: pathlib.Path, info: BlobInfo) -> BlobInfo:
        self._check_open()
        validate_blob_name(name)
        if name in self._blobs:
            raise AlreadyExistsError("BLOB_EXISTS", f"blob {name!r} was already written")
        if not _SHA256_HEX.fullmatch(info.sha256):
            raise InvalidArgumentError("BAD_HANDOFF", f"{name!r}: sha256 {info.sha256[:80]!r} is not 64 hex digits")
        _check_handed_file(source, name, info.size)
        target = self._dir / name
        try:
            os.rename(source, target)
        except FileNotFoundError:
            raise InvalidArgumentError("BAD_HANDOFF", f"{name!r} was removed before it could be taken") from None
        except OSError as err:
            if err.errno == errno.EXDEV:
                raise FailedPreconditionError(
                    "HANDOFF_OTHER_FILESYSTEM", f"{name!r} lies on another filesystem than the store") from None
            raise
        try:  # what was checked is what was moved (nothing swapped it in between)
            _check_handed_file(target, name, info.size)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        self._blobs[name] = info = BlobInfo(name, info.size, info.sha256)
        return info

    def _stream_to(self, path: pathlib.Path, name: str, chunks: Iterable[bytes]) -> BlobInfo:
        digest = hashlib.sha256()
        size = 0
        with open(path, "xb") as file:
            for chunk in chunks:
                digest.update(chunk)
                file.write(chunk)
                size += len(chunk)
            file.flush()
            if self._store._fsync:
                os.fsync(file.fileno())
        return BlobInfo(name, size, digest.hexdigest())

    def commit(self, metadata: dict) -> Manifest:
        self._check_open()
        manifest = Manifest(
            key=self.key,
            blobs=tuple(self._blobs.values()),
            metadata=canonical_metadata(metadata),
            commit_time=time.time(),
        )
        try:
            with disk_full_as_exhausted(f"committing {self.key!r}"):
                self._store._write_file(self._dir / MANIFEST_NAME, manifest_json(manifest))
                self._store._sync_dir(self._dir)
                self._store._publish(self._dir, self.key)
        except BaseException:
            self.abort()
            raise
        self._committed = True
        self._closed = True
        return manifest

    def abort(self) -> None:
        if self._committed:
            return
        self._closed = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPreconditionError("WRITER_CLOSED", f"writer of {self.key!r} was committed or aborted")


def sync_dir(path: pathlib.Path) -> None:
    """fsync a directory, so the entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
