"""A CheckpointStore around another one that counts the bytes written and read and times
every operation (the `tunemesh_checkpoint_*` metrics)."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterable, Iterator

from tunemesh_checkpoint.store import BlobInfo, CheckpointStore, CheckpointWriter, Manifest
from tunemesh_common.service.metrics import result_of
from tunemesh_checkpoint.metrics import CheckpointMetrics


class MeteredStore:
    """Same behaviour as `store`; every call is also recorded in `metrics`."""

    def __init__(self, store: CheckpointStore, metrics: CheckpointMetrics) -> None:
        self._store, self._metrics = store, metrics

    def writer(self, key: str) -> CheckpointWriter:
        return _MeteredWriter(self._store.writer(key), self._metrics)

    def manifest(self, key: str) -> Manifest:
        with self._metrics.op("manifest"):
            return self._store.manifest(key)

    def read_blob(self, key: str, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Errors about the blob still come from this call; the stream's time is the time
        spent inside the inner store (disk), not the time the reader takes between chunks."""
        start = time.perf_counter()
        try:
            chunks = self._store.read_blob(key, name, chunk_size)
        except BaseException as exc:
            self._metrics.observe_op("read_file", time.perf_counter() - start, result_of(exc))
            raise
        return self._counted(chunks, time.perf_counter() - start)

    def _counted(self, chunks: Iterator[bytes], seconds: float) -> Iterator[bytes]:
        result = "error"  # also when the reader stops early
        try:
            while True:
                start = time.perf_counter()
                try:
                    chunk = next(chunks, None)
                finally:
                    seconds += time.perf_counter() - start
                if chunk is None:
                    result = "ok"
                    return
                self._metrics.read(len(chunk))
                yield chunk
        finally:
            self._metrics.observe_op("read_file", seconds, result)

    def list(self, prefix: str) -> list[Manifest]:
        with self._metrics.op("list"):
            return self._store.list(prefix)

    def update_metadata(self, key: str, metadata: dict) -> Manifest:
        with self._metrics.op("update"):
            return self._store.update_metadata(key, metadata)

    def delete(self, key: str) -> None:
        with self._metrics.op("delete"):
            self._store.delete(key)

    def recover(self) -> int:
        return self._store.recover()


class _MeteredWriter(CheckpointWriter):
    def __init__(self, writer: CheckpointWriter, metrics: CheckpointMetrics) -> None:
        self._writer, self._metrics = writer, metrics

    @property
    def committed(self) -> bool:
        return self._writer.committed

    def write_blob(self, name: str, chunks: Iterable[bytes]) -> BlobInfo:
        with self._metrics.op("write_file"):
            info = self._writer.write_blob(name, chunks)
        self._metrics.written(info.size)
        return info

    def adopt_blob(self, name: str, source: pathlib.Path, info: BlobInfo) -> BlobInfo:
        with self._metrics.op("adopt_file"):
            info = self._writer.adopt_blob(name, source, info)
        self._metrics.written(info.size)
        return info

    def commit(self, metadata: dict) -> Manifest:
        with self._metrics.op("commit"):
            return self._writer.commit(metadata)

    def abort(self) -> None:
        self._writer.abort()
