"""The scheduler's call store: calls of runs too large for etcd, one file each.

    <root>/{run_id}/{seq_id:020d}                a kept call (the scheduler's bytes)
    <root>/{run_id}/{seq_id:020d}.tmp-<random>   a put in progress

The root lies next to the checkpoint store's objects/, outside every tenant's prefix. A
put writes a temporary file beside its target, syncs it and renames it over the target,
so a reader sees a call whole (the old one or the new one) or not at all; `recover()`
removes what a crash left. Run ids are single safe path segments and seq_ids positive
integers, so no key can name a path outside the root.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import secrets
import threading
import typing
from collections.abc import Iterable, Iterator

from tunemesh_common.checkpoints.paths import is_segment
from tunemesh.errors import InvalidArgumentError, NotFoundError
from tunemesh_checkpoint.store import disk_full_as_exhausted, sync_dir

logger = logging.getLogger(__name__)

RUN_PREFIX = "runs/"
_CALL_NAME = re.compile(r"[0-9]{20}")
_TMP_MARK = ".tmp-"
_MAX_SEQ_ID = 10**20 - 1  # what 20 digits hold


class FilesystemCallStore:
    """Calls keyed by (run name `runs/{id}`, seq_id) under `root`. One process owns a
    root; a lock keeps a put's directory from being removed under it."""

    def __init__(self, root: pathlib.Path, *, fsync: bool = True) -> None:
        self.root = pathlib.Path(root)
        self._fsync = fsync
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, run: str, seq_id: int, chunks: Iterable[bytes]) -> int:
        """Keeps the call's bytes (replacing a call kept under the same key); returns its
        size. Nothing changes when `chunks` raises."""
        target = self._call_path(run, seq_id)
        tmp = target.with_name(f"{target.name}{_TMP_MARK}{secrets.token_hex(8)}")
        what = f"keeping call {seq_id} of {run}"
        with self._lock, disk_full_as_exhausted(what):
            if not target.parent.is_dir():
                target.parent.mkdir()
                self._sync_dir(self.root)
            file = open(tmp, "xb")
        try:
            with disk_full_as_exhausted(what):
                with file:
                    size = sum(file.write(chunk) for chunk in chunks)
                    file.flush()
                    if self._fsync:
                        os.fsync(file.fileno())
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(target.parent)
        return size

    def read(self, run: str, seq_id: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The call's bytes in chunks; NotFoundError(CALL_NOT_FOUND) from this call when none is kept."""
        if chunk_size <= 0:
            raise InvalidArgumentError("BAD_CHUNK_SIZE", f"chunk_size must be positive, got {chunk_size}")
        try:
            file = open(self._call_path(run, seq_id), "rb")
        except FileNotFoundError:
            raise NotFoundError("CALL_NOT_FOUND", f"no call {seq_id} of {run} is kept") from None
        return _chunks_of(file, chunk_size)

    def delete(self, run: str, through_seq_id: int | None = None) -> int:
        """Deletes the run's calls with seq_id <= `through_seq_id` (None: all of them, and
        the run's directory); returns how many."""
        if through_seq_id is not None:
            _check_seq_id(through_seq_id)
        run_dir = self.root / run_id_of(run)
        try:
            names = os.listdir(run_dir)
        except FileNotFoundError:
            return 0
        doomed = [n for n in names if _CALL_NAME.fullmatch(n) and (through_seq_id is None or int(n) <= through_seq_id)]
        for name in doomed:
            (run_dir / name).unlink(missing_ok=True)
        if doomed:
            self._sync_dir(run_dir)
        if through_seq_id is None:
            with self._lock:
                try:
                    run_dir.rmdir()
                except OSError:
                    pass  # a put in progress: its call stays
        return len(doomed)

    def recover(self) -> int:
        """Removes what interrupted puts left; returns how many. Run it at start, before
        any put of this root."""
        removed = 0
        for run_dir in self.root.iterdir():
            if not run_dir.is_dir() or run_dir.is_symlink():
                continue
            for entry in run_dir.iterdir():
                if _TMP_MARK in entry.name:
                    entry.unlink(missing_ok=True)
                    removed += 1
        if removed:
            logger.info("call store %s: removed %d leftovers of interrupted puts", self.root, removed)
        return removed

    def _call_path(self, run: str, seq_id: int) -> pathlib.Path:
        _check_seq_id(seq_id)
        return self.root / run_id_of(run) / f"{seq_id:020d}"

    def _sync_dir(self, path: pathlib.Path) -> None:
        if self._fsync:
            sync_dir(path)


def run_id_of(run: str) -> str:
    """The `{id}` of `runs/{id}`; InvalidArgumentError(BAD_CALL_KEY) unless it is one safe segment."""
    run_id = run.removeprefix(RUN_PREFIX) if isinstance(run, str) and run.startswith(RUN_PREFIX) else ""
    if not is_segment(run_id):
        raise InvalidArgumentError("BAD_CALL_KEY", f"bad run name {str(run)[:140]!r}: expected runs/{{id}}")
    return run_id


def _check_seq_id(seq_id: int) -> None:
    if type(seq_id) is not int or not 1 <= seq_id <= _MAX_SEQ_ID:
        raise InvalidArgumentError("BAD_CALL_KEY", f"bad seq_id {seq_id!r}: expected 1 to {_MAX_SEQ_ID}")


def _chunks_of(file: typing.BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with file:
        while chunk := file.read(chunk_size):
            yield chunk
